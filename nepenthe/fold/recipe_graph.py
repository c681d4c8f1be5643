"""The graph of a recipe (docs/method.md §4: what a folded model computes): rebuilt node by node
from JSON (:func:`_build_graph`) and checked for the structure nepenthe.save writes before any
code is generated from it. The same checks run when saving, so that what save writes loads.

Structure: plain input names; node names that torch.fx itself would give (no keyword,
builtin, ``self``, ``torch`` or dunder name: they would shadow what the generated ``forward``
uses); exactly one output node, last, returning tensors in tuples / lists / dicts; no call that
writes into a stored tensor (a parameter, buffer or constant, or a view of one), which would
change the model's weights on every call.
"""

from __future__ import annotations

import builtins
import functools
import inspect
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import RecipeError
from .allowlist import _FUNCTIONS, _METHODS, _check_getattr, _check_identifier, _check_path, _decode

__all__ = []

# Globals the generated forward may look up (torch.fx's reserved names, and modules of targets).
_CODE_GLOBALS = frozenset({"self", "torch", "fx_pytree", "pytree", "device", "inf", "nan", "NoneType", "operator",
                           "builtins", "math", "typing"})
# Inputs are named as the model's forward named them (``input`` for nn.Sequential): only the builtins
# that generated code refers to are refused, since an input of that name would shadow them.
_RESERVED_INPUTS = _CODE_GLOBALS | {"getattr", "slice", "float", "int", "bool", "tuple", "list", "dict", "str", "range",
                                    "len", "isinstance", "type"}
_RESERVED_NODES = _CODE_GLOBALS | set(dir(builtins))  # torch.fx renames such nodes, so save never writes them


def _check_name(what: str, name, reserved) -> None:
    _check_identifier(what, name)
    if name in reserved or name.startswith("__"):
        raise RecipeError(f"recipe gives {what} {name!r}, a name the generated forward reserves (Python builtins it "
                          "uses, self, torch, dunder names): rename it in the model; nepenthe.save never writes one, "
                          "so a recipe.json that has one was altered")


# Calls whose result may be (a view of) their first tensor argument, so that writing into the
# result writes into it.
_VIEW_METHODS = frozenset("""view view_as reshape reshape_as flatten unflatten permute transpose t mT squeeze unsqueeze
    chunk split split_with_sizes tensor_split unbind expand expand_as narrow select diagonal swapaxes movedim unfold
    contiguous to float half double bfloat16 int long bool type_as detach cpu cuda""".split())
_VIEW_FUNCTIONS = {_FUNCTIONS[n] for n in """operator.getitem torch.flatten torch.reshape torch.permute
    torch.transpose torch.swapaxes torch.movedim torch.squeeze torch.unsqueeze torch.narrow torch.select torch.chunk
    torch.split torch.tensor_split torch.unbind torch.broadcast_to torch.diagonal torch.t torch.as_tensor
    builtins.getattr F.dropout F.dropout1d F.dropout2d""".split() if n in _FUNCTIONS}
_VIEW_MODULES = frozenset({"Identity", "Flatten", "Unflatten", "Dropout", "Dropout1d", "Dropout2d"})
# Calls that write into their first argument.
_WRITING_FUNCTIONS = {_FUNCTIONS[n] for n in """operator.setitem operator.iadd operator.isub operator.imul
    operator.itruediv operator.ifloordiv operator.imatmul operator.iand operator.ior torch.sigmoid_""".split()
                      if n in _FUNCTIONS}


@functools.lru_cache(maxsize=512)
def _signature(target) -> inspect.Signature | None:
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a Python signature
        return None


def _bound(target, args, kwargs) -> dict:
    signature = _signature(target)
    try:
        return signature.bind(*args, **kwargs).arguments if signature is not None else dict(kwargs)
    except TypeError:  # arguments it does not take: it fails when called, before writing anything
        return dict(kwargs)


def _written(node: fx.Node, module_writes: Callable[[str], bool]) -> list:
    """The arguments ``node`` writes into."""
    args, kwargs = node.args, node.kwargs
    first = args[:1] or [kwargs.get("input")]
    out = [kwargs["out"]] if "out" in kwargs else []
    if node.op == "call_method":
        return [*out, *(first if node.target.endswith("_") else [])]
    if node.op == "call_module":
        return first if module_writes(node.target) else []
    if node.op != "call_function":
        return []
    if node.target in _WRITING_FUNCTIONS:
        return [*out, *first]
    bound = _bound(node.target, args, kwargs)
    if "out" in bound and bound["out"] is not None:
        out.append(bound["out"])
    if bound.get("inplace"):
        out += first
    if node.target is F.embedding and bound.get("max_norm") is not None:
        out.append(bound.get("weight"))  # renormalizes the table in place
    if node.target is F.batch_norm and bound.get("training"):
        out += [bound.get("running_mean"), bound.get("running_var")]
    if node.target is torch.batch_norm and (args[5] if len(args) > 5 else kwargs.get("training")):
        out += [a for a in args[3:5] if isinstance(a, fx.Node)]
    return out


def _leaves(value) -> list[fx.Node]:
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in _leaves(v)]
    if isinstance(value, dict):
        return _leaves(list(value.values()))
    return [value] if isinstance(value, fx.Node) else []


def _check_writes(graph: fx.Graph, module_writes: Callable[[str], bool],
                 view_module: Callable[[str], bool]) -> None:
    """Refuse a call that writes into a stored tensor (``get_attr``) or a view of one.
    ``module_writes(target)`` / ``view_module(target)``: whether that module writes into / may
    return its input (``inplace=True`` / Identity, Flatten, Dropout, ...)."""
    stored: dict[fx.Node, str] = {}  # node -> the stored tensor it is (a view of)
    for node in graph.nodes:
        if node.op == "get_attr":
            stored[node] = node.target
            continue
        for written in _leaves(_written(node, module_writes)):
            if written in stored:
                raise RecipeError(f"node {node.name!r} ({node.op} {getattr(node.target, '__name__', node.target)}) "
                                  f"writes into the stored tensor {stored[written]!r} on every call; a saved model "
                                  "may not change its own weights: compute a new tensor instead (out-of-place op)")
        aliases = (node.op == "call_method" and (node.target in _VIEW_METHODS or node.target.endswith("_"))) or \
            (node.op == "call_function" and (node.target in _VIEW_FUNCTIONS or node.target in _WRITING_FUNCTIONS)) or \
            (node.op == "call_module" and (view_module(node.target) or module_writes(node.target)))
        if aliases:
            sources = [n for n in node.all_input_nodes if n in stored]
            if sources:
                stored[node] = stored[sources[0]]


def _check_output(value, name) -> None:
    leaves = []

    def visit(v):
        if isinstance(v, (tuple, list)):
            for item in v:
                visit(item)
        elif isinstance(v, dict):
            for item in v.values():
                visit(item)
        elif v is None or isinstance(v, fx.Node):
            leaves.append(v)
        else:
            raise RecipeError(f"the output node {name!r} returns {v!r:.80}; recipes store models that return "
                              "tensors (in tuples, lists or dicts), not constants: return tensors only (a recipe.json "
                              "that returns a constant was altered)")
    visit(value)
    if not any(isinstance(v, fx.Node) for v in leaves):
        raise RecipeError(f"the output node {name!r} returns no tensor; a saved model returns what it computes")


def _check_structure(graph: fx.Graph) -> None:
    """Plain input names, node names fx would give, one output node, last."""
    nodes = list(graph.nodes)
    outputs = [n for n in nodes if n.op == "output"]
    if len(outputs) != 1:
        raise RecipeError(f"the recipe's graph has {len(outputs)} output nodes; a model's forward returns once "
                          "(exactly one output node, the last): the recipe.json was altered, save the model again")
    if nodes[-1].op != "output":
        raise RecipeError(f"the recipe's output node {outputs[0].name!r} is not its last node")
    _check_output(outputs[0].args[0] if outputs[0].args else None, outputs[0].name)
    targets = set()
    for node in nodes:
        if node.op == "placeholder":
            _check_name("input name", node.target, _RESERVED_INPUTS)
            if node.target in targets:
                raise RecipeError(f"recipe names input {node.target!r} twice")
            targets.add(node.target)
        if node.op != "output":
            _check_name("node name", node.name, _RESERVED_NODES)


def _build_graph(recipe: dict, allowed_attributes: set[str], functions: dict[str, Callable]) -> fx.Graph:
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    modules = recipe["modules"]
    for entry in recipe["nodes"]:
        if not isinstance(entry, dict):
            raise RecipeError(f"malformed node {entry!r:.100} in recipe")
        op, target, name = entry.get("op"), entry.get("target"), entry.get("name")
        if op != "output":
            _check_name("node name", name, _RESERVED_NODES)
        if name in nodes:
            raise RecipeError(f"recipe defines node {name!r} twice")
        args, kwargs = _decode(entry.get("args", {"tuple": []}), nodes), _decode(entry.get("kwargs", {"dict": {}}),
                                                                                  nodes)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise RecipeError(f"node {name!r} has malformed arguments")
        for key in kwargs:
            _check_name(f"keyword argument of node {name!r}", key, ())
        if op == "call_function":
            if isinstance(target, str) and target in functions:  # checked against the original's graph
                target = functions[target]
            elif not isinstance(target, str) or target not in _FUNCTIONS:
                raise RecipeError(f"recipe calls function {target!r:.100}, which is not in the allow-list")
            else:
                if target == "builtins.getattr":
                    _check_getattr(name, args)
                target = _FUNCTIONS[target]
        elif op == "call_method":
            if not isinstance(target, str) or target not in _METHODS:
                raise RecipeError(f"recipe calls method {target!r:.100}, which is not in the allow-list")
        elif op == "call_module":
            if not isinstance(target, str) or target not in modules:
                raise RecipeError(f"recipe calls module {target!r:.100}, which its module list does not declare")
        elif op == "get_attr":
            _check_path("attribute", target)  # it is written into the generated forward
            if target not in allowed_attributes:
                raise RecipeError(f"recipe reads attribute {target!r}, which is neither in weights.pt nor a "
                                  "declared constant")
        elif op == "placeholder":
            _check_name("input name", target, _RESERVED_INPUTS)  # a parameter name of the generated forward
        elif op == "output":
            if len(args) != 1 or kwargs:
                raise RecipeError("malformed output node in recipe: it takes one argument")
            graph.output(args[0])
            continue
        else:
            raise RecipeError(f"unknown node op {op!r:.100} in recipe")
        node = graph.create_node(op, target, args, kwargs, name=name)
        if node.name != name:  # torch.fx would rename it: not a name that save writes
            raise RecipeError(f"recipe gives node name {name!r}, which torch.fx renames to {node.name!r}; save the "
                              "model again")
        nodes[name] = node
    _check_structure(graph)

    def spec(target):
        s = modules.get(target)
        return s if isinstance(s, dict) else {}

    def kwargs_of(target):
        k = spec(target).get("kwargs")
        return k if isinstance(k, dict) else {}

    _check_writes(graph, lambda t: bool(kwargs_of(t).get("inplace")), lambda t: spec(t).get("class") in _VIEW_MODULES)
    try:
        graph.lint()
    except RuntimeError as exc:
        raise RecipeError(f"recipe graph is malformed: {exc}") from exc
    return graph
