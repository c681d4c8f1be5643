"""CIFAR ResNet-18 as used by NEPENTHE, EGP and EASIER (17 rectifier layers).

Definition (see ``research/paper.md`` §3 "Models"): the ``huyvnphan/PyTorch_CIFAR10``-style ResNet-18
that EGP/EASIER train from scratch on 32x32 images. Compared with the ImageNet ResNet-18 the stem is a
3x3 stride-1 conv, **but the 3x3/2 max pool is kept** (so the four stages run at 16, 8, 4, 2 pixels
for a 32x32 input). We follow the research notes here rather than the other common CIFAR variant
(no max pool), because the paper's dense baselines and layer counts come from that code.

One deliberate difference from the EGP code: each BasicBlock owns two separate activation modules,
``relu1`` (after ``bn1``) and ``relu2`` (after the residual addition), both ``inplace=False``. EGP
shares one ``self.relu`` per block, which would make a forward hook see two different layers. The
stem rectifier is ``relu`` (fed by ``conv1``), so the 17 call sites are ``relu`` and
``layer{1..4}.{0,1}.relu{1,2}``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "ResNet", "resnet18_cifar"]


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with a skip connection: ``relu2(bn2(conv2(relu1(bn1(conv1 x)))) + skip(x))``.

    ``skip`` is the identity, or a 1x1 conv (with ``stride``) + BN when the shape changes.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class ResNet(nn.Module):
    """ResNet for small images: 3x3/1 stem + BN + ReLU + 3x3/2 max pool, 4 stages, avg pool, ``fc``.

    ``layers`` gives the number of BasicBlocks per stage (``[2, 2, 2, 2]`` for ResNet-18). Stages
    have ``width`` × (1, 2, 4, 8) channels (64 … 512 in the paper); stages 2-4 halve the resolution
    in their first block. A smaller ``width`` keeps the depth and every pattern of the paper's model
    at a fraction of the cost (``width=16``: 1/16 of the multiply-adds).
    """

    def __init__(self, layers: list[int], num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=False)
        # Kept on purpose: the EGP/EASIER CIFAR ResNet-18 keeps the ImageNet max pool (see module doc).
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_stage(width, layers[0], stride=1)
        self.layer2 = self._make_stage(2 * width, layers[1], stride=2)
        self.layer3 = self._make_stage(4 * width, layers[2], stride=2)
        self.layer4 = self._make_stage(8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width * BasicBlock.expansion, num_classes)
        _init_weights(self)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        stage = []
        for block_stride in [stride] + [1] * (blocks - 1):
            stage.append(BasicBlock(self.in_planes, planes, block_stride))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    """CIFAR ResNet-18 (about 11.17M parameters for 10 classes at ``width=64``, 17 ReLU call sites)."""
    return ResNet([2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels, width=width)


def _init_weights(model: nn.Module) -> None:
    # He init (fan_out) for convs as in the reference ResNet code; BN starts as the identity map.
    # The Linear classifier keeps PyTorch's default init, as in the reference code.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
