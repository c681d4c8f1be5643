"""A small VGG-style CNN for 8x8 (sklearn digits) and 28x28 (Fashion-MNIST) inputs.

This is not a model from the NEPENTHE paper. It is the library's own fast test bed: small enough to
train on a CPU in seconds, yet it has every pattern the folding code must handle:

* Conv3x3 -> BN -> ReLU -> Conv1x1 (padding 0) -> BN -> ReLU, i.e. a Conv∘Conv merge whose second
  conv is unpadded (``features.conv2`` after ``features.relu1``);
* Conv3x3 -> BN -> ReLU -> Conv3x3 (padding 1), a merge that widens the kernel to 5x5;
* a max pool between stages (never foldable: it stops a chain);
* Flatten -> Linear -> ReLU -> Linear, a Linear∘Linear merge.

Every rectifier is its own ``nn.ReLU`` module with ``inplace=False`` so that forward hooks see the
pre-activation of exactly one call site.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["SmallCNN"]


def _conv(in_ch: int, out_ch: int, kernel_size: int) -> nn.Conv2d:
    # "Same" padding for odd kernels: 1 for 3x3, 0 for 1x1. No bias: the following BN has one.
    return nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False)


class SmallCNN(nn.Module):
    """Plain-chain CNN: 4 conv+BN+ReLU layers in 2 pooled stages, then a 2-layer MLP head.

    Layout (``w = width``)::

        conv1 3x3 (in -> w)   + bn1 + relu1
        conv2 1x1 (w -> w)    + bn2 + relu2      # unpadded 1x1 right after a ReLU
        pool1 max 2x2
        conv3 3x3 (w -> 2w)   + bn3 + relu3
        conv4 3x3 (2w -> 2w)  + bn4 + relu4
        pool2 max 2x2
        flatten, fc1 (2w * (s/4)^2 -> 4w) + relu5, fc2 (4w -> num_classes)

    5 rectifier call sites. ``input_size`` is the side of the square input (8 or 28 in this project;
    any size >= 4 works); the flatten width is derived from it (8 -> 2x2, 28 -> 7x7).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 8, width: int = 32):
        super().__init__()
        if input_size < 4:
            raise ValueError(f"input_size must be >= 4 (two 2x2 max pools), got {input_size}")
        w = width
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", _conv(in_channels, w, 3)),
                    ("bn1", nn.BatchNorm2d(w)),
                    ("relu1", nn.ReLU(inplace=False)),
                    ("conv2", _conv(w, w, 1)),
                    ("bn2", nn.BatchNorm2d(w)),
                    ("relu2", nn.ReLU(inplace=False)),
                    ("pool1", nn.MaxPool2d(2)),
                    ("conv3", _conv(w, 2 * w, 3)),
                    ("bn3", nn.BatchNorm2d(2 * w)),
                    ("relu3", nn.ReLU(inplace=False)),
                    ("conv4", _conv(2 * w, 2 * w, 3)),
                    ("bn4", nn.BatchNorm2d(2 * w)),
                    ("relu4", nn.ReLU(inplace=False)),
                    ("pool2", nn.MaxPool2d(2)),
                ]
            )
        )

        spatial = input_size // 2 // 2  # two floor-ing 2x2 max pools
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(2 * w * spatial * spatial, 4 * w)
        self.relu5 = nn.ReLU(inplace=False)
        self.fc2 = nn.Linear(4 * w, num_classes)
        self.input_size = input_size
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.flatten(x)
        return self.fc2(self.relu5(self.fc1(x)))


def _init_weights(model: nn.Module) -> None:
    # Standard He init for ReLU nets; BN starts as the identity affine map.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
