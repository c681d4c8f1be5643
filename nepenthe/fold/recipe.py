"""The recipe of a folded model: its graph as JSON data next to a plain state_dict, written from a
``GraphModule`` (``to_recipe``) and rebuilt into one (``_rebuild``). :mod:`~nepenthe.fold.saveload`
writes and reads the folder, :mod:`~nepenthe.fold.registry` holds the module classes a recipe may
name and :mod:`~nepenthe.fold.allowlist` the functions, methods and attributes.

Files written by :func:`~nepenthe.fold.save` into one folder:

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
  ``dtypes``      (since format /3) the dtype of every tensor in weights.pt and constants.pt, so
                  that load refuses a tensor whose dtype the recipe does not declare;
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
import sys
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import RecipeError
from ..graph import TraceError, trace
from ..masks import is_mask_key, remove_masks
from .allowlist import (
    _DTYPES,
    _FUNCTION_NAMES,
    _METHODS,
    _check_getattr,
    _check_path,
    _encode,
    _lookup,
)
from .recipe_graph import _VIEW_MODULES, _build_graph, _check_structure, _check_writes
from .registry import (
    _MODULES,
    _build_module,
    _qualname,
)

__all__ = ["FORMAT", "FROM_ORIGINAL", "built_original", "to_recipe"]

FORMAT = "nepenthe.folded/3"


# /1: no attributes, no modules from the original; /2: no "dtypes" (the dtype of every saved tensor)
_READABLE_FORMATS = ("nepenthe.folded/1", "nepenthe.folded/2", FORMAT)


FROM_ORIGINAL = "<from original>"


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
                                  "which recipes cannot store: it is neither in nepenthe.fold.allowlist._FUNCTIONS nor "
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
    _check_structure(gm.graph)  # refuse now what load would refuse
    _check_writes(gm.graph, lambda t: getattr(gm.get_submodule(t), "inplace", False) is True,
                 lambda t: type(gm.get_submodule(t)).__name__ in _VIEW_MODULES)
    for target in modules:  # refuse now what load would refuse
        _check_path("module path", target)
    for key in attributes:
        _check_path("attribute", key)
    dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in [*state.items(), *constants.items()]}
    recipe = {"format": FORMAT, "source": _source(gm), "modules": modules, "attributes": attributes, "nodes": nodes,
              "dtypes": dtypes}
    return recipe, {k: v.detach().cpu() for k, v in constants.items()}


def _source(model: nn.Module, original: nn.Module | None = None) -> dict:
    from .._version import __version__

    # a GraphModule made by symbolic_trace carries the traced class's __name__ (not its module)
    name = _qualname(type(original)) if original is not None else type(model).__name__
    return {"model": name, "nepenthe": __version__, "torch": torch.__version__}


def to_recipe(gm: fx.GraphModule) -> dict:
    """The JSON-able description of a GraphModule's modules, tensors and graph (see the module doc)."""
    return _describe(gm)[0]


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
    return built_original(original)


def built_original(original) -> nn.Module:
    """``original`` itself, or what calling it (a zero-argument constructor) returns; RecipeError
    when that fails or is not a module."""
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


def _rebuild(recipe: dict, state: dict[str, torch.Tensor], constants: dict[str, torch.Tensor],
             original, check: Callable[[fx.GraphModule], None] | None = None) -> fx.GraphModule:
    """The GraphModule a recipe describes, its tensors on the meta device (``state`` / ``constants``
    give names, and the tensors of constants); ``check(gm)`` runs once its modules and attributes
    are in place, before the graph is built and its code generated."""
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
        if any(is_mask_key(k) for k, _ in module.named_buffers()) and \
                not any(k.startswith(target + ".") and is_mask_key(k) for k in state):  # bool or packed masks
            remove_masks(module)
    for key, info in attributes.items():
        _add_attribute(gm, key, info, constants)
    if check is not None:
        check(gm)
    graph = _build_graph(recipe, set(state) | {k for k, v in attributes.items()
                                               if isinstance(v, dict) and v.get("kind") == "constant"}, functions)
    gm.graph = graph  # generates and compiles forward: every name in it was checked above
    try:
        gm.graph.lint()  # now also checks that every module / attribute a node names exists
    except RuntimeError as exc:
        raise RecipeError(f"recipe graph does not match its modules: {exc}") from exc
    return gm
