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


# name -> factory(input_shape, num_classes, **options); the options are the constructor's own
# keyword arguments (width, depth, hidden, ...), so an experiment config can size a model.
_MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": lambda shape, n, **kw: ResidualMLP(_flat(shape), n, **kw),
    "plain_mlp": lambda shape, n, **kw: MLP(_flat(shape), n, **kw),
    "cnn": lambda shape, n, **kw: SmallCNN(in_channels=shape[0], num_classes=n, input_size=shape[-1], **kw),
    "resnet18": lambda shape, n, **kw: resnet18_cifar(num_classes=n, in_channels=shape[0], **kw),
    "mobilenet_v2": lambda shape, n, **kw: mobilenet_v2_cifar(num_classes=n, in_channels=shape[0], **kw),
    "vgg16_bn": lambda shape, n, **kw: vgg16_bn_cifar(num_classes=n, in_channels=shape[0], **kw),
}


def available_models() -> tuple[str, ...]:
    return tuple(_MODELS)


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **options) -> nn.Module:
    """A freshly initialised model by name for inputs of ``input_shape`` (C, H, W).

    ``options`` go to the model's constructor (e.g. ``width=16`` for ``resnet18``, ``depth=4`` for
    ``mlp``); an option the constructor does not take is an error naming the model.
    """
    try:
        factory = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(_MODELS)}") from None
    try:
        return factory(tuple(input_shape), num_classes, **options)
    except TypeError as exc:
        if options and "unexpected keyword argument" in str(exc):
            raise ValueError(f"model {name!r} does not take the option(s) {sorted(options)}: {exc}") from None
        raise
