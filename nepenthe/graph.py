"""torch.fx helpers shared by measuring, pruning and folding: tracing, rectifier call sites and
the linear op that feeds each of them.

Naming of call sites (the keys of every per-layer dict in nepenthe):

* a module call site is the module's qualified name (``layer1.0.relu1``); when the same module is
  called several times in one forward, the k-th later call is ``name#k`` (``layer1.0.relu#1``),
* a functional call is ``<owner module>.<function>()`` (``blocks.0.gelu()``), ``#k`` likewise; in the
  k-th later call of its owner module the owner is written ``<owner>@k`` (``blocks.0@1.gelu()``).

The hook-based recorder (no tracing) produces the same names for module call sites, so statistics
from both routes can be compared and merged; for an FSDP2 model, measure names functional calls after
the sites of a structure-only trace (``nepenthe/entropy/functional.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
import torch.nn as nn

from .activations import (
    ADD_FUNCTIONS,
    BATCHNORM_MODULES,
    LINEAR_MODULES,
    PASS_THROUGH_MODULES,
    Rectifier,
    is_foreign_rectifier,
    rectifier_of_call,
    rectifier_of_module,
)
from .errors import TraceError

__all__ = ["call_site_name", "cut_layers", "default_channel_dim", "find_sites", "first_linear_ops", "is_fully_sharded",
           "input_reaches_output", "last_linear_ops", "main_operand", "producer_of", "Site", "trace"]


class _Tracer(fx.Tracer):
    """``fx.symbolic_trace``'s tracer, keeping rectifier modules of other libraries whole (leaves),
    so that a Hugging Face ``GELUActivation`` or a user's ``Swish`` is one call site, as ``nn.GELU``."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) or is_foreign_rectifier(m)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        # an FSDP2 module's forward hooks gather its parameters: meaningless on proxies (and they
        # fail), so a structure-only trace goes through its forward without them
        if _is_fsdp_module(m) and not self.is_leaf_module(m, self.path_of_module(m)):
            forward = m.forward
        return super().call_module(m, forward, args, kwargs)


def _is_fsdp_module(m: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(m, FSDPModule)


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether any module of ``model`` is sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``)."""
    return any(_is_fsdp_module(m) for m in model.modules())


def trace(model: nn.Module, purpose: str = "this operation", *, structure_only: bool = False) -> fx.GraphModule:
    """Symbolically trace ``model``, turning failures into an actionable :class:`TraceError`.

    ``structure_only``: the graph will be analysed (which layer feeds which rectifier, cuts), never
    run — which is all an FSDP2-sharded model allows (its submodules run only inside the root's
    forward, where FSDP gathers their parameters)."""
    if isinstance(model, fx.GraphModule):
        return model
    if isinstance(model, nn.Module) and not structure_only and is_fully_sharded(model):
        # FSDP2 gathers a module's parameters in the root module's forward hooks: a traced graph
        # (a new root) would run its submodules on their shards (a wrong result, or FSDP's own error)
        raise TraceError(f"{purpose} needs a torch.fx graph, but {type(model).__name__} is sharded by FSDP2 "
                         "(fully_shard), whose submodules only run inside the root module's forward.")
    for module in model.modules() if isinstance(model, nn.Module) else ():
        rectifier_of_module(module)  # probe other libraries' activations now, not while tracing
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        name = model.__class__.__name__ if isinstance(model, nn.Module) else model.__name__
        return fx.GraphModule(tracer.root, graph, name)
    except Exception as exc:  # fx raises many kinds of errors; all mean the same to the user
        raise TraceError(
            f"{purpose} needs a torch.fx-traceable model, but tracing {type(model).__name__} failed: "
            f"{type(exc).__name__}: {exc}. Make the forward free of data-dependent Python control flow "
            "(or wrap the offending part in a leaf module / torch.fx.wrap) and try again."
        ) from exc


@dataclass
class Site:
    """One rectifier call site in a traced graph."""

    name: str
    node: fx.Node
    rectifier: Rectifier
    module_path: str | None  # set for module call sites
    producer: str | None  # qualified name of the Conv/Linear that feeds it, if any
    channel_dim: int | None  # neuron dimension; None = decide from the tensor's rank at run time


def call_site_name(base: str, index: int) -> str:
    """The name of the ``index``-th call of one module / function base name."""
    return base if index == 0 else f"{base}#{index}"


def default_channel_dim(ndim: int) -> int:
    """Neuron dim when no producer says otherwise: channels of N×C×… maps, else the last dim."""
    return 1 if ndim >= 3 else -1


def _owner_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.keys())) if stack else ""


def _function_name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every rectifier call site of a traced graph, in execution order."""
    sites: list[Site] = []
    seen: dict[str, int] = {}
    taken: set[str] = set()
    for node in gm.graph.nodes:
        module_path = None
        if node.op == "call_module":
            rect = rectifier_of_module(gm.get_submodule(node.target))
            module_path = node.target
            base = node.target
        else:
            rect = rectifier_of_call(node.op, node.target, node.args, node.kwargs)
            owner = _owner_path(node)
            base = f"{owner}.{_function_name(node)}()" if owner else f"{_function_name(node)}()"
        if rect is None:
            continue
        index = seen.get(base, 0)
        name = call_site_name(base, index)
        while name in taken:  # a functional name could collide with another base's #k name
            index += 1
            name = call_site_name(base, index)
        seen[base] = index + 1
        taken.add(name)
        producer = producer_of(gm, node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        sites.append(Site(name, node, rect, module_path, producer, _channel_dim_of(gm, producer)))
    return sites


def _channel_dim_of(gm: fx.GraphModule, producer: str | None) -> int | None:
    if producer is None:
        return None
    module = gm.get_submodule(producer)
    return -1 if isinstance(module, nn.Linear) else 1


def _ancestor_distances(node: fx.Node) -> dict[fx.Node, int]:
    """Shortest backward distance from ``node`` to each of its ancestors (itself at 0)."""
    dist = {node: 0}
    frontier = [node]
    while frontier:
        nxt = []
        for n in frontier:
            for parent in n.all_input_nodes:
                if parent not in dist:
                    dist[parent] = dist[n] + 1
                    nxt.append(parent)
        frontier = nxt
    return dist


def main_operand(add_node: fx.Node) -> fx.Node | None:
    """The residual branch of ``a + b``: the operand farthest from where both paths meet.

    A skip connection is the short path (identity, or one projection), the block's body the long
    one, whatever the module classes are called.
    """
    operands = [a for a in add_node.args if isinstance(a, fx.Node)]
    if len(operands) == 1:
        return operands[0]
    if len(operands) != 2:
        return None
    da, db = _ancestor_distances(operands[0]), _ancestor_distances(operands[1])
    common = set(da) & set(db)
    if not common:
        return None
    reach_a = min(da[c] for c in common)
    reach_b = min(db[c] for c in common)
    if reach_a == reach_b:
        return None
    return operands[0] if reach_a > reach_b else operands[1]


def producer_of(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The Conv/Linear whose output reaches ``node`` through BN, pass-through ops and the body
    branch of residual additions; None when there is none (e.g. the input image)."""
    cur: fx.Node | None = node
    while cur is not None:
        if cur.op == "call_module":
            module = gm.get_submodule(cur.target)
            if isinstance(module, LINEAR_MODULES):
                return cur.target
            if isinstance(module, BATCHNORM_MODULES + PASS_THROUGH_MODULES) and cur.args:
                cur = cur.args[0] if isinstance(cur.args[0], fx.Node) else None
                continue
            return None
        if cur.op == "call_function" and cur.target in ADD_FUNCTIONS:
            cur = main_operand(cur)
            continue
        return None
    return None


# ----- data flow: which linear ops carry the input to the output ----------------------------------

# Ops whose result says something about a tensor's shape, not its values: an input that reaches
# the output only through them (x.size(0) in a flatten) carries no information.
_SHAPE_METHODS = frozenset({"size", "dim", "numel", "shape"})


def _carries_values(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return False
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "getattr" and len(node.args) > 1:
        return node.args[1] not in ("shape", "dtype", "device")
    return True


def input_reaches_output(gm: fx.GraphModule, constant_modules: set[str] | frozenset[str] = frozenset()) -> bool:
    """Whether the model's output still depends on its input when every module in
    ``constant_modules`` outputs a constant (an emptied Conv/Linear: all weights zero, bias only).

    Pure graph reachability: a value path from a placeholder to the output that avoids those
    modules. False means the network is cut: whatever the weights, it computes a constant.
    """
    reached = set()
    for node in gm.graph.nodes:  # topological order
        if node.op == "placeholder":
            reached.add(node)
        elif node.op == "call_module" and node.target in constant_modules:
            continue
        elif _carries_values(node) and any(a in reached for a in node.all_input_nodes):
            if node.op == "output":
                return True
            reached.add(node)
    return False


def cut_layers(gm: fx.GraphModule, candidates, emptied: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """The ``candidates`` (module names) whose emptying, on top of the already ``emptied`` ones,
    would disconnect the model's output from its input (a stem, any conv of a plain chain; not the
    body of a residual block, whose skip path carries the input on)."""
    return {c for c in candidates if not input_reaches_output(gm, set(emptied) | {c})}


def _linear_boundary(gm: fx.GraphModule, forward: bool) -> list[str]:
    """Linear-op modules met first when walking from the inputs (forward) or the output (backward)."""
    nodes = list(gm.graph.nodes)
    start = [n for n in nodes if (n.op == "placeholder" if forward else n.op == "output")]
    seen, found, frontier = set(start), [], list(start)
    while frontier:
        node = frontier.pop()
        nxt = list(node.users) if forward else node.all_input_nodes
        for n in nxt:
            if n in seen:
                continue
            seen.add(n)
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), LINEAR_MODULES):
                found.append(n.target)
            else:
                frontier.append(n)
    return sorted(set(found))


def first_linear_ops(gm: fx.GraphModule) -> list[str]:
    """Conv/Linear modules that read the model's input with no other Conv/Linear before them."""
    return _linear_boundary(gm, forward=True)


def last_linear_ops(gm: fx.GraphModule) -> list[str]:
    """Conv/Linear modules whose output reaches the model's output with no other Conv/Linear after them."""
    return _linear_boundary(gm, forward=False)
