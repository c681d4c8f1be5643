"""Fully connected networks for small inputs (8×8 digits, 28×28 Fashion-MNIST).

``MLP`` is a plain chain Linear–ReLU–…–Linear. ``ResidualMLP`` is a deep MLP whose hidden layers
come in residual blocks ``x + fc2(relu(fc1(x)))``: NEPENTHE collapses a layer by emptying the
linear op that feeds it, and only a skip connection lets the network keep its information when
that happens (the paper's models, ResNets and transformers, all have one). It is the default
model of the main job.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["MLP", "ResidualBlock", "ResidualMLP"]


class MLP(nn.Module):
    """Plain chain: flatten, ``depth`` hidden Linear+ReLU layers of ``width``, Linear classifier."""

    def __init__(self, in_features: int, num_classes: int = 10, width: int = 256, depth: int = 6):
        super().__init__()
        if depth < 1:
            raise ValueError(f"MLP depth must be >= 1, got {depth}")
        layers: list[nn.Module] = [nn.Flatten()]
        features = in_features
        for _ in range(depth):
            layers += [nn.Linear(features, width), nn.ReLU()]
            features = width
        layers.append(nn.Linear(features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResidualBlock(nn.Module):
    """``x + fc2(relu(fc1(x)))``: one rectifier layer whose emptying leaves the identity path."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.relu(self.fc1(x)))


class ResidualMLP(nn.Module):
    """Flatten, input Linear+ReLU, ``depth`` residual blocks, Linear classifier.

    Rectifier layers: 1 (stem) + ``depth``.
    """

    def __init__(self, in_features: int, num_classes: int = 10, width: int = 128, hidden: int = 256,
                 depth: int = 8):
        super().__init__()
        self.flatten = nn.Flatten()
        self.stem = nn.Linear(in_features, width)
        self.stem_relu = nn.ReLU()
        self.blocks = nn.Sequential(*[ResidualBlock(width, hidden) for _ in range(depth)])
        self.head = nn.Linear(width, num_classes)
        # Scale the residual branches down so a deep stack starts close to the identity map.
        for block in self.blocks:
            nn.init.normal_(block.fc2.weight, std=1.0 / (math.sqrt(hidden) * math.sqrt(depth)))
            nn.init.zeros_(block.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem_relu(self.stem(self.flatten(x)))))
