"""CIFAR MobileNetV2 as used by EASIER/NEPENTHE (35 ReLU6 layers).

Definition (see ``research/paper.md`` §3 "Models"): the ``huyvnphan/PyTorch_CIFAR10``-style
MobileNetV2 that EASIER trains from scratch on 32x32 images. It is the standard MobileNetV2
(Sandler et al., 2018) with two strides changed so that small images are not downsampled too early:

* the stem conv has stride 1 instead of 2;
* the second stage (t=6, c=24) has stride 1 instead of 2.

A 32x32 input therefore reaches the last stage at 4x4. The classifier is Dropout(0.2) + Linear.

Rectifier call sites: 1 stem + 1 in the t=1 block (no expansion conv) + 2 in each of the 16 other
blocks + 1 in the final 1x1 conv = 35. Each is its own ``nn.ReLU6(inplace=False)`` so that hooks
see one call site each.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["ConvBNReLU6", "InvertedResidual", "MobileNetV2", "mobilenet_v2_cifar"]

# (expansion t, output channels c, repeats n, first stride s); s of the 2nd row is 1 for CIFAR.
CIFAR_INVERTED_RESIDUAL_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled channel count to a multiple of ``divisor``, never dropping more than 10%.

    This is the usual MobileNet rule; at ``width_mult=1`` all channel counts are unchanged.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNReLU6(nn.Sequential):
    """``conv`` (no bias) -> ``bn`` -> ``act`` (ReLU6); ``groups=channels`` gives a depthwise conv."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        padding = kernel_size // 2  # "same" padding: 1 for 3x3, 0 for 1x1
        conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False)
        super().__init__(
            OrderedDict([("conv", conv), ("bn", nn.BatchNorm2d(out_ch)), ("act", nn.ReLU6(inplace=False))])
        )


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6) -> 3x3 depthwise (ReLU6) -> 1x1 linear projection + BN, skip if shapes match.

    With ``expand_ratio == 1`` the expansion conv is omitted (``expand is None``), so the block has a
    single rectifier. The projection has no activation (the "linear bottleneck").
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_residual = stride == 1 and in_ch == out_ch
        self.expand = ConvBNReLU6(in_ch, hidden, kernel_size=1) if expand_ratio != 1 else None
        self.depthwise = ConvBNReLU6(hidden, hidden, kernel_size=3, stride=stride, groups=hidden)
        self.project = nn.Conv2d(hidden, out_ch, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.project_bn(self.project(self.depthwise(out)))
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2: ``features`` (stem, 17 inverted residual blocks, 1x1 conv to 1280) -> avg pool
    -> ``classifier`` (Dropout, Linear)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
        setting: list[tuple[int, int, int, int]] | None = None,
        stem_stride: int = 1,
        dropout: float = 0.2,
    ):
        super().__init__()
        setting = CIFAR_INVERTED_RESIDUAL_SETTING if setting is None else setting
        in_ch = _make_divisible(32 * width_mult)
        # The last conv is only widened, never narrowed, by width_mult (as in the original paper).
        self.last_channels = _make_divisible(1280 * max(1.0, width_mult))

        layers: list[nn.Module] = [ConvBNReLU6(in_channels, in_ch, kernel_size=3, stride=stem_stride)]
        for t, c, n, s in setting:
            out_ch = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, stride=s if i == 0 else 1, expand_ratio=t))
                in_ch = out_ch
        layers.append(ConvBNReLU6(in_ch, self.last_channels, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channels, num_classes))
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def mobilenet_v2_cifar(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> MobileNetV2:
    """CIFAR MobileNetV2 (about 2.24M parameters for 10 classes at width 1, 35 ReLU6 call sites)."""
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels, width_mult=width_mult)


def _init_weights(model: nn.Module) -> None:
    # Standard MobileNetV2 init: He (fan_out) convs, identity BN, small-normal classifier.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
