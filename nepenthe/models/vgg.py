"""CIFAR VGG-16-bn as used by EASIER/NEPENTHE (15 ReLU layers).

Definition: VGG-16 with BatchNorm (Simonyan & Zisserman, 2015), configuration "D": 13 3x3 conv+BN+ReLU
layers in 5 max-pooled stages. For 32x32 inputs the five pools leave a 1x1x512 map, so the classifier
is the small CIFAR one, 512 -> 512 -> 512 -> num_classes with Dropout, instead of the 4096-wide
ImageNet head. The research notes (``research/paper.md`` §3) count 15 rectifier layers for VGG-16
(13 conv + 2 classifier), which is what this layout gives. Each rectifier is its own
``nn.ReLU(inplace=False)``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VGG", "VGG16_CFG", "vgg16_bn_cifar"]

# Output channels of each conv; "M" is a 2x2/2 max pool.
VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M"] + [256, 256, 256, "M"] + [512, 512, 512, "M"] * 2


class VGG(nn.Module):
    """VGG with BatchNorm: ``features`` (conv/BN/ReLU/pool stack from ``cfg``) -> flatten -> ``classifier``.

    The classifier has two hidden Linear+ReLU layers of width ``hidden`` (each followed by Dropout).
    The input must be downsampled to 1x1 by the pools (32x32 for the 5-pool VGG-16 configuration).
    """

    def __init__(
        self,
        cfg: list[int | str],
        num_classes: int = 10,
        in_channels: int = 3,
        hidden: int = 512,
        dropout: float = 0.5,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                # No conv bias: the BN right after it has one (torchvision keeps both; it is redundant).
                layers += [
                    nn.Conv2d(channels, int(v), 3, padding=1, bias=False),
                    nn.BatchNorm2d(int(v)),
                    nn.ReLU(inplace=False),
                ]
                channels = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=False),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=False),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg16_bn_cifar(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """CIFAR VGG-16-bn (about 15.25M parameters for 10 classes, 15 ReLU call sites)."""
    return VGG(VGG16_CFG, num_classes=num_classes, in_channels=in_channels)


def _init_weights(model: nn.Module) -> None:
    # Standard VGG init: He (fan_out) convs, identity BN, small-normal Linear layers.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
