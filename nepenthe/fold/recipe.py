"""Save / load a folded model as a plain state_dict plus a JSON recipe of its graph.

Files written by :func:`save` into one folder:

* ``weights.pt``    the model's ``state_dict()`` (tensors only), read back with
                    ``torch.load(weights_only=True)``;
* ``constants.pt``  only when needed: tensors the model holds outside its state_dict
                    (non-persistent buffers, tensor constants read by the graph), also tensors only;
* ``recipe.json``   what is needed to rebuild the ``torch.fx.GraphModule`` around those tensors:

  ``modules``     qualified name -> ``{"class": <registered name>, "kwargs": {...}}`` for module
                  classes in the registry (:func:`register_module`), or
                  ``{"class": "<from original>", "type": "<module>.<qualname>"}`` for any other
                  module, which :func:`load` then copies from the original (unfolded) model;
  ``attributes``  parameters / buffers that no listed module provides (e.g. a parameter read by
                  a ``get_attr`` node) and every constant: kind, shape, dtype;
  ``nodes``       every graph node: op, name, target (a function or method *name* from the
                  allow-lists below, ``"<from original>module:function"`` for a function of the
                  model's own code, or a module / attribute path) and encoded arguments;
  ``source``      (informational) the model's class, nepenthe and torch versions.

Loading never unpickles code and never resolves a name from the recipe outside the allow-lists:
module classes come from the registry, functions from ``_FUNCTIONS``, methods from ``_METHODS``,
``getattr`` only for ``_TENSOR_ATTRIBUTES``; a ``get_attr`` node may only read a tensor restored
from weights.pt / constants.pt; modules that are not in the registry come from the ``original``
model the caller passes (checked against the recorded class), and so do functions outside
``_FUNCTIONS`` (e.g. the ``torch.fx.wrap``-ped helpers of torchvision's Swin attention): only a
function that the original model's own traced graph calls can be named. Nothing in a recipe is
imported, evaluated or looked up by ``getattr`` on an arbitrary object.
"""

from __future__ import annotations

import builtins
import copy
import inspect
import json
import keyword
import math
import operator
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import atomic_torch_save, atomic_write_json
from ..errors import RecipeError
from ..graph import TraceError, trace
from ..masks import MASK_SUFFIX, remove_masks
from . import algebra
from .algebra import ChannelAffine

FORMAT = "nepenthe.folded/2"
_READABLE_FORMATS = ("nepenthe.folded/1", FORMAT)  # /1: no attributes, no modules from the original
FROM_ORIGINAL = "<from original>"



def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# ----- module registry ----------------------------------------------------------------------------
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
    from .scenario import StateRectifier

    if kwargs["kind"] not in ("relu", "relu6", "leaky_relu", "gelu", "silu", "hardswish"):
        raise ValueError(f"unknown rectifier kind {kwargs['kind']!r}")
    rect = Rectifier(kind=str(kwargs["kind"]), upper=kwargs["upper"], off_slope=float(kwargs["off_slope"]),
                     exact=bool(kwargs["exact"]), approximate=str(kwargs["approximate"]))
    n = int(kwargs["channels"])
    return StateRectifier(rect, torch.zeros(n, dtype=torch.bool), torch.zeros(n), torch.zeros(n),
                          int(kwargs["channel_dim"]))


def _register_builtin_modules() -> None:
    from .border import BorderCorrectedConv
    from .scenario import StateRectifier

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
    register_module(algebra.ChannelOffset, lambda m: dict(channels=m.offset.numel(), channel_dim=m.channel_dim),
                    build=lambda kw: algebra.ChannelOffset(torch.zeros(int(kw["channels"])), int(kw["channel_dim"])))
    register_module(algebra.ConstantChannels,
                    lambda m: dict(channels=m.value.numel(), channel_dim=m.channel_dim, geometry=m.geometry),
                    build=lambda kw: algebra.ConstantChannels(torch.zeros(int(kw["channels"])), int(kw["channel_dim"]),
                                                              list(kw["geometry"])))
    register_module(BorderCorrectedConv, BorderCorrectedConv.recipe_kwargs,
                    build=BorderCorrectedConv.from_recipe_kwargs)
    register_module(StateRectifier, _state_rectifier_args, build=_state_rectifier)


_register_builtin_modules()


def _build_module(cls_name: str, kwargs) -> nn.Module:
    spec = _MODULES.get(cls_name) if isinstance(cls_name, str) else None
    if spec is None:
        raise RecipeError(f"recipe names module class {cls_name!r}, which is not in the allow-list "
                          f"(nepenthe.fold.register_module)")
    if not isinstance(kwargs, dict):
        raise RecipeError(f"recipe gives module class {cls_name!r} malformed arguments {kwargs!r}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    try:
        with torch.device("meta"):  # shapes only: every tensor is then taken from the saved files
            module = spec.make(kwargs)
    except Exception as exc:  # a constructor given bad arguments may raise anything
        raise RecipeError(f"recipe gives module class {cls_name!r} arguments it does not accept: "
                          f"{type(exc).__name__}: {exc}") from exc
    if type(module) is not spec.cls:
        raise RecipeError(f"building {cls_name!r} gave a {type(module).__name__}")
    return module


# ----- functions, methods and attributes a graph may use ------------------------------------------
def _collect(prefix: str, namespace, names: str) -> dict:
    # Fixed names from this file; a name missing from this torch version is simply left out.
    return {f"{prefix}.{n}": getattr(namespace, n) for n in names.split() if hasattr(namespace, n)}


# Pure tensor functions, by a stable name (the names of recipes written earlier must not change).
_FUNCTIONS: dict[str, Callable] = {
    **_collect("operator", operator, """add iadd sub isub mul imul truediv itruediv floordiv ifloordiv mod pow
        matmul imatmul neg pos abs invert getitem setitem eq ne lt le gt ge and_ or_ xor not_ iand ior"""),
    **_collect("torch", torch, """flatten cat concat concatenate stack hstack vstack add sub subtract mul multiply div
        divide true_divide floor_divide remainder fmod matmul mm bmm baddbmm addmm einsum relu sigmoid tanh mean sum
        amax amin max min maximum minimum clamp clip abs exp log log2 sqrt rsqrt pow square neg reciprocal erf sign
        softmax log_softmax layer_norm group_norm batch_norm chunk split tensor_split unbind reshape permute transpose
        swapaxes movedim squeeze unsqueeze narrow select roll flip where masked_fill gather index_select cumsum
        topk sort argmax argmin zeros ones full zeros_like ones_like full_like empty_like arange linspace meshgrid
        tensor as_tensor scalar_tensor tril triu outer norm var std logsumexp prod all any isnan isfinite
        nan_to_num floor ceil round trunc sin cos atan2 broadcast_to tile repeat_interleave diag diagonal cdist
        t addcmul addcdiv lerp gelu silu relu6 hardswish _assert sigmoid_"""),
    **_collect("F", F, """relu relu6 leaky_relu gelu silu hardswish hardsigmoid sigmoid tanh mish elu softplus
        hardtanh prelu softmax log_softmax layer_norm group_norm batch_norm normalize linear conv1d conv2d conv3d
        conv_transpose1d conv_transpose2d pad interpolate adaptive_avg_pool1d adaptive_avg_pool2d
        adaptive_max_pool2d avg_pool1d avg_pool2d max_pool1d max_pool2d dropout dropout1d dropout2d embedding
        scaled_dot_product_attention unfold fold pixel_shuffle pixel_unshuffle glu one_hot"""),
    "builtins.getattr": builtins.getattr,  # only with a name from _TENSOR_ATTRIBUTES (checked on both sides)
}
_FUNCTION_NAMES = {id(f): name for name, f in _FUNCTIONS.items()}

# Tensor methods that compute on tensors only (none takes a callable or touches files / globals).
_METHODS = frozenset("""view view_as reshape reshape_as flatten unflatten size dim numel mean sum amax amin max min
    permute transpose contiguous relu relu_ add add_ sub sub_ mul mul_ div div_ neg pow matmul squeeze unsqueeze
    chunk split unbind expand expand_as repeat softmax log_softmax sigmoid tanh exp log sqrt rsqrt abs clamp clamp_
    clamp_min clamp_max float half double bfloat16 to type_as masked_fill masked_fill_ roll flip narrow t gather
    index_select new_zeros new_ones new_full new_empty new_tensor zero_ fill_ clone detach norm var std cumsum
    argmax argmin topk sort all any eq ne lt le gt ge floor ceil round int long bool sign reciprocal square
    erf gelu silu where tril triu diagonal mT swapaxes movedim select split_with_sizes tensor_split outer bmm
    mm baddbmm addmm unfold repeat_interleave cpu cuda logsumexp prod""".split())
_TENSOR_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "T", "mT", "is_cuda", "layout", "requires_grad"})

_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_MEMORY_FORMATS = {str(f).removeprefix("torch."): f for f in vars(torch).values() if isinstance(f, torch.memory_format)}
_LAYOUTS = {str(f).removeprefix("torch."): f for f in vars(torch).values() if isinstance(f, torch.layout)}
_PATH_PART = re.compile(r"[A-Za-z0-9_\-]+")  # no quotes: paths end up in generated code


def _check_getattr(node_name: str, args) -> None:
    if not (isinstance(args, tuple) and len(args) == 2 and args[1] in _TENSOR_ATTRIBUTES):
        raise RecipeError(f"node {node_name!r} reads attribute {args[1:]!r} of a value; recipes allow only "
                          f"{sorted(_TENSOR_ATTRIBUTES)}")


def _check_identifier(what: str, name) -> None:
    if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)):
        raise RecipeError(f"recipe gives {what} {name!r}, which is not a Python identifier")


def _check_path(what: str, path) -> list[str]:
    parts = path.split(".") if isinstance(path, str) else [None]
    if not all(isinstance(p, str) and _PATH_PART.fullmatch(p) and not p.startswith("__") for p in parts):
        raise RecipeError(f"recipe gives {what} {path!r}, which is not a plain dotted module path")
    return parts


# ----- argument encoding ----------------------------------------------------------------------
def _encode(value):
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise RecipeError(f"cannot store a dict argument with non-string keys in a recipe: {value!r}")
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise RecipeError(f"cannot store graph argument {value!r} of type {type(value).__name__} in a recipe")


def _lookup(table: dict, kind: str, name):
    if not isinstance(name, str) or name not in table:
        raise RecipeError(f"unknown {kind} {name!r} in recipe")
    return table[name]


def _decode(value, nodes: dict[str, fx.Node]):
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise RecipeError(f"malformed argument {value!r} in recipe")
    (tag, inner), = value.items()
    if tag == "node":
        if not isinstance(inner, str) or inner not in nodes:
            raise RecipeError(f"recipe refers to node {inner!r} before defining it")
        return nodes[inner]
    if tag in ("tuple", "slice") and isinstance(inner, list):
        items = [_decode(v, nodes) for v in inner]
        if tag == "tuple":
            return tuple(items)
        if len(items) != 3:
            raise RecipeError(f"malformed slice {inner!r} in recipe")
        return slice(*items)
    if tag == "dict" and isinstance(inner, dict):
        return {k: _decode(v, nodes) for k, v in inner.items()}
    if tag == "ellipsis":
        return Ellipsis
    if tag == "dtype":
        return _lookup(_DTYPES, "dtype", inner)
    if tag == "memory_format":
        return _lookup(_MEMORY_FORMATS, "memory format", inner)
    if tag == "layout":
        return _lookup(_LAYOUTS, "layout", inner)
    if tag == "device" and isinstance(inner, str):
        try:
            return torch.device(inner)
        except (RuntimeError, ValueError) as exc:
            raise RecipeError(f"unknown device {inner!r} in recipe") from exc
    if tag == "float" and inner in ("inf", "-inf", "nan"):
        return float(inner)
    raise RecipeError(f"malformed argument {value!r} in recipe")


# ----- writing a recipe --------------------------------------------------------------------------
def _tensor_info(t: torch.Tensor, kind: str) -> dict:
    info = {"kind": kind, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if kind == "parameter":
        info["requires_grad"] = bool(t.requires_grad)
    return info


def _check_rebuilds(target: str, name: str, m: nn.Module, kwargs: dict, state: dict) -> set[str]:
    """Build the registered module on meta from its kwargs (as load will) and compare tensors:
    a registration whose kwargs do not reproduce the module is refused now rather than at load.
    Returns the state keys under ``target`` that the rebuilt module provides."""
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"to_kwargs of {name} gave arguments that are not JSON-able for {target!r}: {exc}") from exc
    rebuilt = _build_module(name, json.loads(json.dumps(kwargs)))
    provided = set()
    for key, t in rebuilt.state_dict().items():
        full = f"{target}.{key}"
        if full not in state:
            raise RecipeError(f"module {target!r} ({name}) has no tensor {key!r} although its registered class "
                              "builds one; fix the class's to_kwargs / build")
        if tuple(t.shape) != tuple(state[full].shape):
            raise RecipeError(f"module {target!r} ({name}) rebuilt from its recipe arguments gives {key!r} the "
                              f"shape {tuple(t.shape)}, not {tuple(state[full].shape)}; fix the class's to_kwargs")
        provided.add(full)
    return provided


def _describe(gm: fx.GraphModule) -> tuple[dict, dict[str, torch.Tensor]]:
    """(recipe, constants): the JSON-able description of ``gm`` and its tensors outside the state_dict."""
    if not isinstance(gm, fx.GraphModule):
        raise RecipeError(f"save needs the torch.fx.GraphModule returned by nepenthe.fold, got {type(gm).__name__}")
    state = gm.state_dict(keep_vars=True)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise RecipeError(f"state_dict entries {bad[:5]} are not tensors (module extra state); recipes store "
                          "tensors only")
    params = dict(gm.named_parameters(remove_duplicate=False))
    modules: dict[str, dict] = {}
    provided: set[str] = set()  # state keys that the listed modules bring along
    constants: dict[str, torch.Tensor] = {}
    nodes = []
    for node in gm.graph.nodes:
        entry = {"op": node.op, "name": node.name, "target": node.target, "args": _encode(node.args),
                 "kwargs": _encode(dict(node.kwargs))}
        if node.op == "call_module":
            if node.target not in modules:
                m = gm.get_submodule(node.target)
                name = type(m).__name__
                spec = _MODULES.get(name)
                if spec is not None and type(m) is spec.cls:
                    kwargs = spec.to_kwargs(m)
                    provided |= _check_rebuilds(node.target, name, m, kwargs, state)
                    modules[node.target] = {"class": name, "kwargs": kwargs}
                else:
                    modules[node.target] = {"class": FROM_ORIGINAL, "type": _qualname(type(m))}
                    provided |= {k for k in state if k.startswith(node.target + ".")}
        elif node.op == "call_function":
            name = _FUNCTION_NAMES.get(id(node.target)) or _original_function_name(node.target)
            if name is None:
                raise RecipeError(f"node {node.name!r} calls {getattr(node.target, '__qualname__', node.target)!r}, "
                                  "which recipes cannot store: it is neither in nepenthe.fold.recipe._FUNCTIONS nor "
                                  "a module-level Python function of the model's code")
            if node.target is builtins.getattr:
                _check_getattr(node.name, node.args)
            entry["target"] = name
        elif node.op == "call_method":
            if node.target not in _METHODS:
                raise RecipeError(f"node {node.name!r} calls method {node.target!r}, which recipes cannot store")
        elif node.op == "placeholder":
            if not (node.target.isidentifier() and not keyword.iskeyword(node.target)):
                raise RecipeError(f"input {node.target!r}: recipes store plain named inputs only (no *args)")
        elif node.op == "get_attr":
            owner, _, leaf = node.target.rpartition(".")
            value = getattr(gm.get_submodule(owner), leaf, None)
            if node.target in state:
                pass  # restored from weights.pt
            elif isinstance(value, torch.Tensor):
                constants[node.target] = value  # a non-persistent buffer or a tensor constant of the graph
            else:
                raise RecipeError(f"node {node.name!r} reads attribute {node.target!r} of type "
                                  f"{type(value).__name__}; recipes can only read tensors")
        nodes.append(entry)
    # every tensor must come back from a file: non-persistent buffers too
    for key, buf in gm.named_buffers(remove_duplicate=False):
        if key not in state:
            constants[key] = buf
    attributes = {k: _tensor_info(v, "parameter" if k in params else "buffer") for k, v in state.items()
                  if k not in provided}
    attributes.update({k: _tensor_info(v, "constant") for k, v in constants.items()})
    for target in modules:  # refuse now what load would refuse
        _check_path("module path", target)
    for key in attributes:
        _check_path("attribute", key)
    recipe = {"format": FORMAT, "source": _source(gm), "modules": modules, "attributes": attributes, "nodes": nodes}
    return recipe, {k: v.detach().cpu() for k, v in constants.items()}


def _source(model: nn.Module, original: nn.Module | None = None) -> dict:
    from .._version import __version__

    # a GraphModule made by symbolic_trace carries the traced class's __name__ (not its module)
    name = _qualname(type(original)) if original is not None else type(model).__name__
    return {"model": name, "nepenthe": __version__, "torch": torch.__version__}


def to_recipe(gm: fx.GraphModule) -> dict:
    """The JSON-able description of a GraphModule's modules, tensors and graph (see the module doc)."""
    return _describe(gm)[0]


# ----- rebuilding ----------------------------------------------------------------------------------
def _child(parent: nn.Module, part: str, create: bool) -> nn.Module:
    """``parent``'s submodule ``part`` (only registered submodules are looked at: no getattr)."""
    child = parent._modules.get(part)
    if child is None:
        if not create:
            raise KeyError(part)
        child = nn.Module()
        try:
            parent.add_module(part, child)
        except KeyError as exc:  # the name is a method / attribute of nn.Module
            raise RecipeError(f"recipe path part {part!r} clashes with an attribute of nn.Module") from exc
    return child


def _walk(root: nn.Module, parts: list[str], create: bool) -> nn.Module:
    for part in parts:
        root = _child(root, part, create)
    return root


def _source_hint(recipe: dict) -> str:
    source = recipe.get("source")
    model = source.get("model") if isinstance(source, dict) else None
    return f" (an instance of {model}, built with the same arguments as when it was folded)" \
        if isinstance(model, str) else ""


def _resolve_original(original, recipe: dict, needed: dict[str, str]) -> nn.Module:
    if original is None:
        listed = ", ".join(f"{t!r} ({q})" for t, q in list(needed.items())[:6])
        more = f" and {len(needed) - 6} more" if len(needed) > 6 else ""
        raise RecipeError(
            f"this folded model keeps {len(needed)} module(s) or function(s) that recipes cannot rebuild on their "
            f"own: {listed}{more}. "
            f"Pass the original (unfolded) model{_source_hint(recipe)} to take them from it: "
            "nepenthe.load(directory, original=model) or original=lambda: MyModel(...); only their structure is "
            "used, every weight comes from weights.pt")
    if not isinstance(original, nn.Module) and callable(original):
        try:
            original = original()
        except Exception as exc:  # the caller's constructor: say so rather than blame the recipe
            raise RecipeError(f"building the original model with original() failed: {type(exc).__name__}: "
                              f"{exc}") from exc
    if not isinstance(original, nn.Module):
        raise RecipeError(f"original must be the original nn.Module or a zero-argument function returning it, "
                          f"got {type(original).__name__}")
    return original


def _from_original(original: nn.Module, target: str, parts: list[str], expected) -> nn.Module:
    try:
        module = _walk(original, parts, create=False)
    except KeyError:
        hint = (" Folding created it, so its class must be registered with nepenthe.fold.register_module "
                "before saving." if isinstance(expected, str) and expected.startswith("nepenthe.") else "")
        raise RecipeError(f"the original model has no submodule {target!r}, which the folded model takes from it "
                          f"(a {expected}); pass the model that was folded.{hint}") from None
    if _qualname(type(module)) != expected:
        raise RecipeError(f"submodule {target!r} of the original model is a {_qualname(type(module))}, but the "
                          f"folded model was saved with a {expected} there; pass the model that was folded")
    return copy.deepcopy(module)


def _original_function_name(function) -> str | None:
    """``"<from original>module:name"`` for a module-level Python function (what ``torch.fx.wrap``
    keeps as a leaf call, e.g. torchvision's ``shifted_window_attention``); None for anything else
    (lambdas, nested functions, builtins, bound methods), which a name cannot bring back."""
    if not inspect.isfunction(function):
        return None
    module, name = getattr(function, "__module__", None), getattr(function, "__qualname__", "")
    if not (isinstance(module, str) and name.isidentifier()):
        return None
    if getattr(sys.modules.get(module), name, None) is not function:
        return None
    return f"{FROM_ORIGINAL}{module}:{name}"


def _functions_of(original: nn.Module) -> dict[str, Callable]:
    """The functions outside ``_FUNCTIONS`` that the original model's own traced graph calls, by
    recipe name: the only ones a recipe may name (nothing is imported or looked up by name)."""
    try:
        graph = trace(original, "checking the functions a saved model calls").graph
    except TraceError as exc:
        raise RecipeError(f"the recipe calls functions of the original model's code, and checking them needs "
                          f"the original model to be traceable: {exc}") from exc
    found = {}
    for node in graph.nodes:
        if node.op == "call_function" and id(node.target) not in _FUNCTION_NAMES:
            name = _original_function_name(node.target)
            if name is not None:
                found[name] = node.target
    return found


def _check_functions(original: nn.Module, wanted) -> dict[str, Callable]:
    """The wanted "<from original>" functions, each one that the original model's graph calls."""
    available = _functions_of(original)
    missing = [f for f in wanted if f not in available]
    if missing:
        shown = ", ".join(f.removeprefix(FROM_ORIGINAL) for f in missing[:4])
        raise RecipeError(f"the folded model calls {shown}, which the original model's traced graph does not "
                          "call; pass the model that was folded")
    return {f: available[f] for f in wanted}


def _add_attribute(root: nn.Module, key: str, info, constants: dict[str, torch.Tensor]) -> None:
    *path, leaf = _check_path("attribute", key)
    if not isinstance(info, dict) or info.get("kind") not in ("parameter", "buffer", "constant"):
        raise RecipeError(f"recipe declares attribute {key!r} with a malformed description {info!r}")
    parent = _walk(root, path, create=True)
    if info["kind"] == "constant":
        if key not in constants:
            raise RecipeError(f"recipe declares constant {key!r}, which constants.pt does not hold")
        if leaf in parent._buffers:
            parent._buffers[leaf] = constants[key]
            return
        value = constants[key]
    else:
        shape, dtype = info.get("shape"), _lookup(_DTYPES, "dtype", info.get("dtype"))
        if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                for s in shape)):
            raise RecipeError(f"recipe declares attribute {key!r} with a malformed shape {shape!r}")
        if leaf in parent._parameters or leaf in parent._buffers:
            return  # the module built for it already has this slot
        value = torch.empty(shape, dtype=dtype, device="meta")  # filled by load_state_dict(assign=True)
    try:
        if info["kind"] == "parameter":
            grad = bool(info.get("requires_grad", False)) and (value.is_floating_point() or value.is_complex())
            parent.register_parameter(leaf, nn.Parameter(value, requires_grad=grad))
        else:
            parent.register_buffer(leaf, value, persistent=info["kind"] == "buffer")
    except (KeyError, TypeError) as exc:
        raise RecipeError(f"recipe attribute {key!r} cannot be registered: {exc}") from exc


def _build_graph(recipe: dict, allowed_attributes: set[str], functions: dict[str, Callable]) -> fx.Graph:
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    modules = recipe["modules"]
    for entry in recipe["nodes"]:
        if not isinstance(entry, dict):
            raise RecipeError(f"malformed node {entry!r} in recipe")
        op, target, name = entry.get("op"), entry.get("target"), entry.get("name")
        _check_identifier("node name", name)
        if name in nodes:
            raise RecipeError(f"recipe defines node {name!r} twice")
        args, kwargs = _decode(entry.get("args", {"tuple": []}), nodes), _decode(entry.get("kwargs", {"dict": {}}),
                                                                                  nodes)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise RecipeError(f"node {name!r} has malformed arguments")
        for key in kwargs:
            _check_identifier(f"keyword argument of node {name!r}", key)
        if op == "call_function":
            if isinstance(target, str) and target in functions:  # checked against the original's graph
                target = functions[target]
            elif target not in _FUNCTIONS:
                raise RecipeError(f"recipe calls function {target!r}, which is not in the allow-list")
            else:
                if target == "builtins.getattr":
                    _check_getattr(name, args)
                target = _FUNCTIONS[target]
        elif op == "call_method":
            if target not in _METHODS:
                raise RecipeError(f"recipe calls method {target!r}, which is not in the allow-list")
        elif op == "call_module":
            if not isinstance(target, str) or target not in modules:
                raise RecipeError(f"recipe calls module {target!r}, which its module list does not declare")
        elif op == "get_attr":
            _check_path("attribute", target)  # it is written into the generated forward
            if target not in allowed_attributes:
                raise RecipeError(f"recipe reads attribute {target!r}, which is neither in weights.pt nor a "
                                  "declared constant")
        elif op == "placeholder":
            _check_identifier("input name", target)  # it becomes a parameter name in the generated forward
        elif op == "output":
            if len(args) != 1:
                raise RecipeError("malformed output node in recipe")
            graph.output(args[0])
            continue
        else:
            raise RecipeError(f"unknown node op {op!r} in recipe")
        nodes[name] = graph.create_node(op, target, args, kwargs, name=name)
    try:
        graph.lint()
    except RuntimeError as exc:
        raise RecipeError(f"recipe graph is malformed: {exc}") from exc
    return graph


def _rebuild(recipe: dict, state: dict[str, torch.Tensor], constants: dict[str, torch.Tensor],
             original) -> fx.GraphModule:
    if not isinstance(recipe, dict) or recipe.get("format") not in _READABLE_FORMATS:
        raise RecipeError(f"not a nepenthe folded-model recipe (expected format {FORMAT!r})")
    modules, attributes, node_list = recipe.get("modules"), recipe.get("attributes", {}), recipe.get("nodes")
    if not (isinstance(modules, dict) and isinstance(attributes, dict) and isinstance(node_list, list)):
        raise RecipeError("malformed recipe: 'modules', 'attributes' and 'nodes' must be an object, an object "
                          "and a list")
    specs = {}
    for target, spec in modules.items():
        if not isinstance(spec, dict):
            raise RecipeError(f"recipe gives module {target!r} a malformed description {spec!r}")
        specs[target] = (_check_path("module path", target), spec)
    needed = {t: s.get("type") for t, (_, s) in specs.items() if s.get("class") == FROM_ORIGINAL}
    wanted_functions = sorted({e.get("target") for e in node_list if isinstance(e, dict)
                               and e.get("op") == "call_function" and isinstance(e.get("target"), str)
                               and e["target"].startswith(FROM_ORIGINAL)})
    if needed or wanted_functions:
        named = {**needed, **{f.removeprefix(FROM_ORIGINAL): "function" for f in wanted_functions}}
        original = _resolve_original(original, recipe, named)
    functions = _check_functions(original, wanted_functions) if wanted_functions else {}

    source = recipe.get("source")
    class_name = source.get("model", "").rpartition(".")[2] if isinstance(source, dict) else ""
    if not (isinstance(class_name, str) and class_name.isidentifier()):
        class_name = "GraphModule"
    # The tree is built on the GraphModule itself (GraphModule(root, graph) would copy only what
    # the nodes name, and turn non-persistent buffers into persistent ones).
    gm = fx.GraphModule(nn.Module(), fx.Graph(), class_name)
    taken = []  # modules copied from the original model
    for target, (parts, spec) in sorted(specs.items(), key=lambda item: len(item[1][0])):  # parents first
        if spec.get("class") == FROM_ORIGINAL:
            module = _from_original(original, target, parts, spec.get("type"))
            taken.append((target, module))
        else:
            module = _build_module(spec.get("class"), spec.get("kwargs", {}))
        parent = _walk(gm, parts[:-1], create=True)
        try:
            parent.add_module(parts[-1], module)
        except KeyError as exc:
            raise RecipeError(f"recipe module path {target!r} clashes with an attribute of the module") from exc
    for target, module in taken:  # folding drops the masks of pruned layers; so does a copy from the original
        if any(k.endswith(MASK_SUFFIX) for k, _ in module.named_buffers()) and \
                not any(k.startswith(target + ".") and k.endswith(MASK_SUFFIX) for k in state):
            remove_masks(module)
    for key, info in attributes.items():
        _add_attribute(gm, key, info, constants)
    gm.graph = _build_graph(recipe, set(state) | {k for k, v in attributes.items()
                                                  if isinstance(v, dict) and v.get("kind") == "constant"},
                            functions)
    try:
        gm.graph.lint()  # now also checks that every module / attribute a node names exists
    except RuntimeError as exc:
        raise RecipeError(f"recipe graph does not match its modules: {exc}") from exc
    return gm


# ----- save / load ------------------------------------------------------------------------------
def save(model: nn.Module, directory: str | Path, extra: dict | None = None, *,
         original: nn.Module | None = None) -> Path:
    """Write a folded model into ``directory``: ``recipe.json``, ``weights.pt`` (its ``state_dict``)
    and, when the model holds tensors outside its state_dict, ``constants.pt`` (all written atomically).
    ``model`` is what :func:`nepenthe.fold` returned: a ``torch.fx.GraphModule``, or any
    fx-traceable module (e.g. the copy of the model that ``fold`` returns when folding is not
    faster), which is traced first.

    Modules whose class is not registered (:func:`register_module`: the common ``torch.nn`` layers
    and nepenthe's own) are recorded by name and class, and :func:`load` takes them from the
    original model. ``extra`` (JSON-able) is stored as the recipe's ``"extra"``. ``original``
    (optional): the model that was folded; its class is recorded in the recipe's ``source`` and
    every module to be taken from it is checked to be there now, rather than at load time.
    Raises :class:`RecipeError` for graphs that recipes cannot describe (a function outside the
    allow-list, an attribute that is not a tensor, ...).
    """
    directory = Path(directory)
    report = getattr(model, "fold_report", None)
    if not isinstance(model, fx.GraphModule):  # e.g. fold() kept the original model (report.returned)
        source = _source(model, original if original is not None else model)
        model = trace(copy.deepcopy(model), "saving")
    else:
        source = _source(model, original)
    recipe, constants = _describe(model)
    recipe["source"] = source
    if original is not None:
        for target, spec in recipe["modules"].items():
            if spec["class"] == FROM_ORIGINAL:
                _from_original(original, target, target.split("."), spec["type"])
        _check_functions(original, sorted({n["target"] for n in recipe["nodes"] if n["op"] == "call_function"
                                           and n["target"].startswith(FROM_ORIGINAL)}))
    if report is not None:
        recipe["fold_report"] = report.to_dict()
    if extra:
        recipe["extra"] = extra
    try:
        json.dumps(recipe)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"the recipe is not JSON-able (check `extra` and registered to_kwargs): {exc}") from exc
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, directory / "weights.pt")
    if constants:
        atomic_torch_save(constants, directory / "constants.pt")
    else:
        (directory / "constants.pt").unlink(missing_ok=True)  # a stale one from an earlier save
    atomic_write_json(recipe, directory / "recipe.json")
    return directory


def _load_tensors(path: Path, map_location) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise RecipeError(f"{path} is missing; pass the folder written by nepenthe.save") from None
    except Exception as exc:  # weights_only refusal (pickle.UnpicklingError), corrupt zip, ...
        raise RecipeError(f"{path} cannot be read as plain tensors with torch.load(weights_only=True) "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); it was not "
                          "written by nepenthe.save or has been altered") from exc
    if not (isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in data.items())):
        raise RecipeError(f"{path} must hold a dict of named tensors")
    return data


def load(directory: str | Path, original: nn.Module | Callable[[], nn.Module] | None = None,
         map_location: str | torch.device = "cpu") -> fx.GraphModule:
    """Rebuild a folded model saved by :func:`save`, in eval mode (no code is unpickled).

    ``original``: needed only when the folded model keeps modules outside the registry (a custom
    attention block, ``nn.MultiheadAttention``, ...) or calls functions of the model's own code
    (``torch.fx.wrap``-ped helpers such as torchvision Swin's attention); the error says which.
    Pass the original (unfolded) model, built with the same arguments, or a zero-argument function
    that builds it (called only when needed). Those modules are deep-copied from it after checking
    their class, and those functions must be ones that its traced graph calls; every weight, also
    the modules', comes from ``weights.pt`` (``torch.load(weights_only=True)``).
    ``map_location``: device for the loaded model. Raises :class:`RecipeError` for anything
    missing, malformed or outside the allow-lists.
    """
    if isinstance(original, (str, torch.device)):
        raise TypeError(f"load(directory, original=None, map_location='cpu'): got {original!r} as `original`; "
                        "pass the device as map_location=")
    directory = Path(directory)
    try:
        recipe = json.loads((directory / "recipe.json").read_text())
    except FileNotFoundError:
        raise RecipeError(f"{directory} has no recipe.json; pass the folder written by nepenthe.save") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{directory / 'recipe.json'} is not valid JSON: {exc}") from exc
    if not isinstance(recipe, dict) or recipe.get("format") not in _READABLE_FORMATS:
        raise RecipeError(f"not a nepenthe folded-model recipe (expected format {FORMAT!r})")
    state = _load_tensors(directory / "weights.pt", map_location)
    attributes = recipe.get("attributes", {})
    wants_constants = isinstance(attributes, dict) and any(
        isinstance(v, dict) and v.get("kind") == "constant" for v in attributes.values())
    constants = _load_tensors(directory / "constants.pt", map_location) if wants_constants else {}
    for key, info in (attributes.items() if isinstance(attributes, dict) else ()):
        if not isinstance(info, dict):
            continue  # refused with a clear message while rebuilding
        tensor = (constants if info.get("kind") == "constant" else state).get(key)
        dtype = str(tensor.dtype).removeprefix("torch.") if tensor is not None else None
        if tensor is not None and (info.get("shape") != list(tensor.shape) or info.get("dtype") != dtype):
            raise RecipeError(f"tensor {key!r} in the saved files is {dtype} {list(tensor.shape)}, but the "
                              f"recipe declares {info.get('dtype')} {info.get('shape')}")
    try:
        gm = _rebuild(recipe, state, constants, original)
    except RecipeError:
        raise
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
        raise RecipeError(f"malformed recipe: {type(exc).__name__}: {exc}") from exc
    try:
        gm.load_state_dict(state, strict=True, assign=True)  # assign: keep the saved dtypes and devices
    except RuntimeError as exc:
        raise RecipeError(f"weights.pt does not match the recipe: {exc}") from exc
    left = [k for k, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
            if t.is_meta]
    if left:
        raise RecipeError(f"tensors {left[:5]} were not restored from the saved files (a registered module that "
                          "creates tensors outside its state_dict?)")
    if isinstance(map_location, (str, torch.device)):
        gm.to(map_location)  # what came from the original model, too
    gm.eval()
    return gm
