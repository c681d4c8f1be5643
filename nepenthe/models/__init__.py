"""Model definitions used by the paper's experiments and by the main job.

``build_model(name, input_shape, num_classes)`` gives every model by name; the constructors are
also importable directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch.nn as nn

from .cnn import SmallCNN
from .mlp import MLP, ResidualMLP
from .mobilenet_v2 import mobilenet_v2_cifar
from .resnet import resnet18_cifar
from .vgg import vgg16_bn_cifar

__all__ = ["MLP", "ResidualMLP", "SmallCNN", "available_models", "build_model", "mobilenet_v2_cifar",
           "resnet18_cifar", "vgg16_bn_cifar"]


def _flat(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


_MODELS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "mlp": lambda shape, n: ResidualMLP(_flat(shape), n),
    "plain_mlp": lambda shape, n: MLP(_flat(shape), n),
    "cnn": lambda shape, n: SmallCNN(in_channels=shape[0], num_classes=n, input_size=shape[-1]),
    "resnet18": lambda shape, n: resnet18_cifar(num_classes=n, in_channels=shape[0]),
    "mobilenet_v2": lambda shape, n: mobilenet_v2_cifar(num_classes=n, in_channels=shape[0]),
    "vgg16_bn": lambda shape, n: vgg16_bn_cifar(num_classes=n, in_channels=shape[0]),
}


def available_models() -> tuple[str, ...]:
    return tuple(_MODELS)


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A freshly initialised model by name for inputs of ``input_shape`` (C, H, W)."""
    try:
        factory = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(_MODELS)}") from None
    return factory(tuple(input_shape), num_classes)
