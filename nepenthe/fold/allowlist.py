"""What a recipe may name, and how graph arguments are encoded: the allow-lists of functions,
tensor methods and attributes, the identifier / path checks, and the argument encoding
(everything a recipe holds is data; nothing is imported or evaluated)."""

from __future__ import annotations

import builtins
import keyword
import math
import operator
import re
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import RecipeError

__all__ = []


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
