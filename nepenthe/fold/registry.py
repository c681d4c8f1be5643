"""The module registry of recipes: how each module class a folded graph may hold is stored
(JSON-able constructor arguments) and rebuilt; :func:`register_module` adds a class."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import RecipeError
from . import modules
from .modules import BorderCorrectedConv, ChannelAffine, StateRectifier

__all__ = ["ModuleSpec", "register_module"]


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class ModuleSpec:
    """How a registered module class is stored (``to_kwargs``) and rebuilt (``build``)."""

    cls: type
    to_kwargs: Callable[[nn.Module], dict]
    build: Callable[[dict], nn.Module] | None = None

    def make(self, kwargs: dict) -> nn.Module:
        return self.build(kwargs) if self.build is not None else self.cls(**kwargs)


_MODULES: dict[str, ModuleSpec] = {}


def register_module(cls: type, to_kwargs: Callable[[nn.Module], dict],
                    build: Callable[[dict], nn.Module] | None = None) -> type:
    """Let recipes store and rebuild modules of class ``cls`` without the original model.

    * ``to_kwargs(module) -> dict``: JSON-able constructor arguments of a module of exactly this
      class (subclasses are not covered; register them separately).
    * ``build(kwargs) -> module`` (optional, default ``cls(**kwargs)``): for classes whose
      constructor does not take those arguments directly (e.g. ``ChannelAffine`` is built from
      tensors: ``build`` makes placeholders of the right shapes).

    The recipe names the class by ``cls.__name__``, which must be unique in the registry. Lists in
    the kwargs come back as tuples. On load the module is built on the ``meta`` device and then
    *every* parameter and buffer of the model is taken from the saved files, so the constructor
    only has to give the right tensor names and shapes (its initial values are never used); this
    is checked when saving. Register at import time of the module that defines the class so that
    ``import nepenthe`` makes it loadable. Returns ``cls``.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_module needs an nn.Module subclass, got {cls!r}")
    if not callable(to_kwargs) or (build is not None and not callable(build)):
        raise TypeError("register_module(cls, to_kwargs, build=None): to_kwargs and build must be callables")
    old = _MODULES.get(cls.__name__)
    if old is not None and old.cls is not cls and _qualname(old.cls) != _qualname(cls):
        raise ValueError(f"a module class named {cls.__name__!r} ({_qualname(old.cls)}) is already registered; "
                         f"recipes name classes by their __name__, so {_qualname(cls)} cannot be registered too")
    _MODULES[cls.__name__] = ModuleSpec(cls, to_kwargs, build)
    return cls


def _conv_args(m) -> dict:
    args = dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=list(m.kernel_size),
                stride=list(m.stride), padding=m.padding if isinstance(m.padding, str) else list(m.padding),
                dilation=list(m.dilation), groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)
    if m.transposed:
        args["output_padding"] = list(m.output_padding)
    return args


def _bn_args(m) -> dict:
    return dict(num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                track_running_stats=m.track_running_stats)


def _pool_args(m) -> dict:
    keys = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "count_include_pad", "divisor_override",
            "return_indices")
    return {k: getattr(m, k) for k in keys if hasattr(m, k)}


def _inplace(m) -> dict:
    return dict(inplace=m.inplace)


def _none(m) -> dict:
    return {}


def _channel_affine(kwargs: dict) -> ChannelAffine:
    n = int(kwargs["channels"])
    return ChannelAffine(torch.zeros(n), torch.zeros(n), int(kwargs["channel_dim"]))


def _state_rectifier_args(m) -> dict:
    r = m.rect
    return dict(kind=r.kind, upper=r.upper, off_slope=r.off_slope, exact=r.exact, approximate=r.approximate,
                channels=m.keep.numel(), channel_dim=m.channel_dim)


def _state_rectifier(kwargs: dict) -> nn.Module:
    from ..activations import Rectifier
    if kwargs["kind"] not in ("relu", "relu6", "leaky_relu", "gelu", "silu", "hardswish"):
        raise ValueError(f"unknown rectifier kind {kwargs['kind']!r}")
    rect = Rectifier(kind=str(kwargs["kind"]), upper=kwargs["upper"], off_slope=float(kwargs["off_slope"]),
                     exact=bool(kwargs["exact"]), approximate=str(kwargs["approximate"]))
    n = int(kwargs["channels"])
    return StateRectifier(rect, torch.zeros(n, dtype=torch.bool), torch.zeros(n), torch.zeros(n),
                          int(kwargs["channel_dim"]))


def _register_builtin_modules() -> None:
    for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d):
        register_module(cls, _conv_args)
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        register_module(cls, _bn_args)
    for cls in (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d):
        register_module(cls, _pool_args)
    for cls in (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Mish):
        register_module(cls, _inplace)
    for cls in (nn.Identity, nn.Sigmoid, nn.Tanh):
        register_module(cls, _none)
    register_module(nn.Linear, lambda m: dict(in_features=m.in_features, out_features=m.out_features,
                                              bias=m.bias is not None))
    register_module(nn.LayerNorm, lambda m: dict(normalized_shape=list(m.normalized_shape), eps=m.eps,
                                                 elementwise_affine=m.elementwise_affine,
                                                 bias=getattr(m, "bias", None) is not None))
    register_module(nn.GroupNorm, lambda m: dict(num_groups=m.num_groups, num_channels=m.num_channels, eps=m.eps,
                                                 affine=m.affine))
    register_module(nn.LeakyReLU, lambda m: dict(negative_slope=m.negative_slope, inplace=m.inplace))
    register_module(nn.GELU, lambda m: dict(approximate=m.approximate))
    register_module(nn.ELU, lambda m: dict(alpha=m.alpha, inplace=m.inplace))
    register_module(nn.Hardtanh, lambda m: dict(min_val=m.min_val, max_val=m.max_val, inplace=m.inplace))
    register_module(nn.PReLU, lambda m: dict(num_parameters=m.num_parameters))
    register_module(nn.Softmax, lambda m: dict(dim=m.dim))
    register_module(nn.LogSoftmax, lambda m: dict(dim=m.dim))
    register_module(nn.Flatten, lambda m: dict(start_dim=m.start_dim, end_dim=m.end_dim))
    register_module(nn.Unflatten, lambda m: dict(dim=m.dim, unflattened_size=list(m.unflattened_size)))
    for cls in (nn.Dropout, nn.Dropout1d, nn.Dropout2d):
        register_module(cls, lambda m: dict(p=m.p, inplace=m.inplace))
    for cls in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d):
        register_module(cls, lambda m: dict(output_size=m.output_size))
    register_module(nn.AdaptiveMaxPool2d, lambda m: dict(output_size=m.output_size, return_indices=m.return_indices))
    register_module(nn.Embedding, lambda m: dict(num_embeddings=m.num_embeddings, embedding_dim=m.embedding_dim,
                                                 padding_idx=m.padding_idx, max_norm=m.max_norm,
                                                 norm_type=m.norm_type, scale_grad_by_freq=m.scale_grad_by_freq,
                                                 sparse=m.sparse))
    register_module(ChannelAffine, lambda m: dict(channels=m.slope.numel(), channel_dim=m.channel_dim),
                    build=_channel_affine)
    register_module(modules.ChannelOffset, lambda m: dict(channels=m.offset.numel(), channel_dim=m.channel_dim),
                    build=lambda kw: modules.ChannelOffset(torch.zeros(int(kw["channels"])), int(kw["channel_dim"])))
    register_module(modules.ConstantChannels,
                    lambda m: dict(channels=m.value.numel(), channel_dim=m.channel_dim, geometry=m.geometry),
                    build=lambda kw: modules.ConstantChannels(torch.zeros(int(kw["channels"])), int(kw["channel_dim"]),
                                                              list(kw["geometry"])))
    register_module(BorderCorrectedConv, BorderCorrectedConv.recipe_kwargs,
                    build=BorderCorrectedConv.from_recipe_kwargs)
    register_module(StateRectifier, _state_rectifier_args, build=_state_rectifier)


_register_builtin_modules()


_FACTORY_KWARGS = frozenset({"device", "dtype", "memory_format", "pin_memory", "layout"})


def _build_module(cls_name: str, kwargs) -> nn.Module:
    spec = _MODULES.get(cls_name) if isinstance(cls_name, str) else None
    if spec is None:
        raise RecipeError(f"recipe names module class {cls_name!r}, which is not in the allow-list "
                          f"(nepenthe.fold.register_module)")
    if not isinstance(kwargs, dict):
        raise RecipeError(f"recipe gives module class {cls_name!r} malformed arguments {kwargs!r}")
    factory = sorted(set(kwargs) & _FACTORY_KWARGS)
    if factory:  # an explicit device= would allocate despite the meta device below (and before any size check)
        raise RecipeError(f"recipe gives module class {cls_name!r} the argument(s) {factory}; saved modules are built "
                          "on the meta device and take device and dtype from weights.pt (load(map_location=...)), "
                          "so nepenthe.save never writes them: remove them from recipe.json or save again")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    try:
        with torch.device("meta"):  # shapes only: every tensor is then taken from the saved files
            module = spec.make(kwargs)
    except Exception as exc:  # a constructor given bad arguments may raise anything
        raise RecipeError(f"recipe gives module class {cls_name!r} arguments it does not accept: "
                          f"{type(exc).__name__}: {exc}") from exc
    if type(module) is not spec.cls:
        raise RecipeError(f"building {cls_name!r} gave a {type(module).__name__}")
    real = [k for k, t in [*module.named_parameters(), *module.named_buffers()] if not t.is_meta]
    if real:
        raise RecipeError(f"building {cls_name!r} allocated {real[:3]} outside the meta device; its registered build "
                          "must create tensors with the current default device (no device=)")
    return module
