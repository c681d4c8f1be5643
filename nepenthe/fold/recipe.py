"""Save / load a folded model as a plain state_dict plus a JSON recipe of its graph.

The recipe lists every submodule (class from an allow-list and its constructor arguments) and
every graph node (op, target, arguments). Loading rebuilds the ``torch.fx.GraphModule`` from the
recipe and reads the weights with ``torch.load(weights_only=True)``: no pickled code is ever
executed, and a recipe naming anything outside the allow-lists is refused.

Files: ``<dir>/recipe.json`` and ``<dir>/weights.pt``.
"""

from __future__ import annotations

import json
import math
import operator
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import atomic_torch_save, atomic_write_json
from .algebra import ChannelAffine

FORMAT = "nepenthe.folded/1"


class RecipeError(ValueError):
    """A recipe cannot be written or read (unsupported module / function, malformed file)."""


def _conv_args(m) -> dict:
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=list(m.kernel_size),
                stride=list(m.stride), padding=m.padding if isinstance(m.padding, str) else list(m.padding),
                dilation=list(m.dilation), groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)


def _bn_args(m) -> dict:
    return dict(num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                track_running_stats=m.track_running_stats)


def _pool_args(m) -> dict:
    keys = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "count_include_pad", "divisor_override",
            "return_indices")
    return {k: getattr(m, k) for k in keys if hasattr(m, k)}


# class name -> (class, function giving JSON-able constructor kwargs)
_MODULES = {
    "Linear": (nn.Linear, lambda m: dict(in_features=m.in_features, out_features=m.out_features,
                                          bias=m.bias is not None)),
    "Conv1d": (nn.Conv1d, _conv_args),
    "Conv2d": (nn.Conv2d, _conv_args),
    "BatchNorm1d": (nn.BatchNorm1d, _bn_args),
    "BatchNorm2d": (nn.BatchNorm2d, _bn_args),
    "LayerNorm": (nn.LayerNorm, lambda m: dict(normalized_shape=list(m.normalized_shape), eps=m.eps,
                                                elementwise_affine=m.elementwise_affine,
                                                bias=getattr(m, "bias", None) is not None)),
    "ReLU": (nn.ReLU, lambda m: dict(inplace=m.inplace)),
    "ReLU6": (nn.ReLU6, lambda m: dict(inplace=m.inplace)),
    "LeakyReLU": (nn.LeakyReLU, lambda m: dict(negative_slope=m.negative_slope, inplace=m.inplace)),
    "GELU": (nn.GELU, lambda m: dict(approximate=m.approximate)),
    "SiLU": (nn.SiLU, lambda m: dict(inplace=m.inplace)),
    "Hardswish": (nn.Hardswish, lambda m: dict(inplace=m.inplace)),
    "Identity": (nn.Identity, lambda m: {}),
    "Flatten": (nn.Flatten, lambda m: dict(start_dim=m.start_dim, end_dim=m.end_dim)),
    "Dropout": (nn.Dropout, lambda m: dict(p=m.p)),
    "MaxPool2d": (nn.MaxPool2d, _pool_args),
    "AvgPool2d": (nn.AvgPool2d, _pool_args),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, lambda m: dict(output_size=m.output_size)),
    "ChannelAffine": (ChannelAffine, lambda m: dict(channels=m.slope.numel(), channel_dim=m.channel_dim)),
}

# Functions a graph may call, by a stable name.
_FUNCTIONS = {
    "operator.add": operator.add, "operator.iadd": operator.iadd, "operator.mul": operator.mul,
    "operator.getitem": operator.getitem, "operator.sub": operator.sub, "operator.truediv": operator.truediv,
    "torch.flatten": torch.flatten, "torch.cat": torch.cat, "torch.add": torch.add, "torch.relu": torch.relu,
    "torch.mean": torch.mean, "torch.sigmoid": torch.sigmoid, "torch.tanh": torch.tanh,
    "F.relu": F.relu, "F.relu6": F.relu6, "F.leaky_relu": F.leaky_relu, "F.gelu": F.gelu, "F.silu": F.silu,
    "F.hardswish": F.hardswish, "F.adaptive_avg_pool2d": F.adaptive_avg_pool2d, "F.avg_pool2d": F.avg_pool2d,
    "F.max_pool2d": F.max_pool2d, "F.dropout": F.dropout, "F.linear": F.linear, "F.conv2d": F.conv2d,
}
_FUNCTION_NAMES = {id(f): name for name, f in _FUNCTIONS.items()}
_METHODS = {"view", "reshape", "flatten", "size", "mean", "permute", "transpose", "contiguous", "relu", "add",
            "mul", "sum", "squeeze", "unsqueeze", "chunk", "split", "dim"}


def _build_module(cls_name: str, kwargs: dict) -> nn.Module:
    if cls_name not in _MODULES:
        raise RecipeError(f"recipe names module class {cls_name!r}, which is not in the allow-list")
    cls = _MODULES[cls_name][0]
    if cls is ChannelAffine:
        n = kwargs["channels"]
        return ChannelAffine(torch.zeros(n), torch.zeros(n), kwargs["channel_dim"])
    for key in ("kernel_size", "stride", "padding", "dilation", "normalized_shape"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise RecipeError(f"recipe gives module class {cls_name!r} arguments it does not accept: {exc}") from exc


# ----- argument encoding ----------------------------------------------------------------------
def _encode(value):
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise RecipeError(f"cannot store graph argument {value!r} of type {type(value).__name__} in a recipe")


def _decode(value, nodes: dict[str, fx.Node]):
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    if "node" in value:
        return nodes[value["node"]]
    if "tuple" in value:
        return tuple(_decode(v, nodes) for v in value["tuple"])
    if "dict" in value:
        return {k: _decode(v, nodes) for k, v in value["dict"].items()}
    if "slice" in value:
        return slice(*(_decode(v, nodes) for v in value["slice"]))
    if "dtype" in value:
        dtype = getattr(torch, value["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise RecipeError(f"unknown dtype {value['dtype']!r} in recipe")
        return dtype
    if "float" in value:
        return float(value["float"])
    raise RecipeError(f"malformed argument {value!r} in recipe")


# ----- save / load ------------------------------------------------------------------------------
def to_recipe(gm: fx.GraphModule) -> dict:
    """The JSON-able description of a GraphModule's modules and graph."""
    modules = {}
    nodes = []
    for node in gm.graph.nodes:
        entry = {"op": node.op, "name": node.name, "args": _encode(node.args), "kwargs": _encode(dict(node.kwargs))}
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            cls_name = type(m).__name__
            if cls_name not in _MODULES or type(m) is not _MODULES[cls_name][0]:
                raise RecipeError(f"node {node.name!r} calls module {node.target!r} of class {type(m).__qualname__}, "
                                  f"which recipes cannot store; supported: {', '.join(_MODULES)}")
            modules[node.target] = {"class": cls_name, "kwargs": _MODULES[cls_name][1](m)}
            entry["target"] = node.target
        elif node.op == "call_function":
            name = _FUNCTION_NAMES.get(id(node.target))
            if name is None:
                raise RecipeError(f"node {node.name!r} calls {node.target!r}, which recipes cannot store")
            entry["target"] = name
        elif node.op == "call_method":
            if node.target not in _METHODS:
                raise RecipeError(f"node {node.name!r} calls method {node.target!r}, which recipes cannot store")
            entry["target"] = node.target
        elif node.op == "get_attr":
            raise RecipeError(f"node {node.name!r} reads attribute {node.target!r}; recipes store modules only")
        else:  # placeholder, output
            entry["target"] = node.target
        nodes.append(entry)
    return {"format": FORMAT, "modules": modules, "nodes": nodes}


def from_recipe(recipe: dict) -> fx.GraphModule:
    """Rebuild the GraphModule of a recipe (weights uninitialised: load them afterwards)."""
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        raise RecipeError(f"not a nepenthe folded-model recipe (expected format {FORMAT!r})")
    root = nn.Module()
    for target, spec in recipe["modules"].items():
        module = _build_module(spec["class"], dict(spec["kwargs"]))
        parent = root
        *path, leaf = target.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, module)
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for entry in recipe["nodes"]:
        op, target = entry["op"], entry["target"]
        args, kwargs = _decode(entry["args"], nodes), _decode(entry["kwargs"], nodes)
        if op == "call_function":
            if target not in _FUNCTIONS:
                raise RecipeError(f"recipe calls function {target!r}, which is not in the allow-list")
            target = _FUNCTIONS[target]
        elif op == "call_method" and target not in _METHODS:
            raise RecipeError(f"recipe calls method {target!r}, which is not in the allow-list")
        elif op == "call_module" and target not in recipe["modules"]:
            raise RecipeError(f"recipe calls module {target!r}, which its module list does not declare")
        elif op == "get_attr":  # never written by to_recipe; it could reach any attribute of the interpreter
            raise RecipeError(f"recipe reads attribute {target!r}; recipes store modules only")
        elif op not in ("call_module", "call_method", "placeholder", "output"):
            raise RecipeError(f"unknown node op {op!r} in recipe")
        if op == "output":
            graph.output(args[0])
            continue
        node = graph.create_node(op, target, tuple(args), kwargs, name=entry["name"])
        nodes[entry["name"]] = node
    graph.lint()
    return fx.GraphModule(root, graph)


def save(model: fx.GraphModule, directory: str | Path, extra: dict | None = None) -> Path:
    """Write ``recipe.json`` and ``weights.pt`` for a folded model (both written atomically)."""
    directory = Path(directory)
    recipe = to_recipe(model)
    report = getattr(model, "fold_report", None)
    if report is not None:
        recipe["fold_report"] = report.to_dict()
    if extra:
        recipe["extra"] = extra
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, directory / "weights.pt")
    atomic_write_json(recipe, directory / "recipe.json")
    return directory


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> fx.GraphModule:
    """Rebuild a folded model saved by :func:`save` (no code is unpickled)."""
    directory = Path(directory)
    try:
        recipe = json.loads((directory / "recipe.json").read_text())
    except FileNotFoundError:
        raise RecipeError(f"{directory} has no recipe.json; pass the folder written by nepenthe.save") from None
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{directory / 'recipe.json'} is not valid JSON: {exc}") from exc
    gm = from_recipe(recipe)
    state = torch.load(directory / "weights.pt", map_location=map_location, weights_only=True)
    gm.load_state_dict(state)
    gm.eval()
    return gm
