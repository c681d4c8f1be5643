"""Functional rectifier calls (``F.relu(x)``, ``x.relu()``, ``torch.relu_(x)``, ...) counted while the
model's *own* forward runs, for a model whose torch.fx graph may be made for its structure only
(FSDP2: the root's forward hooks gather the parameters, so a traced copy of it cannot run).

A :class:`torch.overrides.TorchFunctionMode`, active only around the model's forward, sees every call
of a function that the graph route recognises as a rectifier (the table of
:func:`~nepenthe.activations.rectifier_of_call`). Forward hooks on every module keep the stack of
the modules running, so each call is known as (owner module, function, k-th call of that function
in that owner during this forward). The call sites of the structure-only graph are indexed by the
same key, in the same execution order (the owner from each node's ``nn_module_stack``), which gives
the call its site name — the name the graph route gives it on the unsharded model, ``b.relu()``,
``b@1.relu()`` for a second call of module ``b``, ``relu()#1``... The input is then counted by the
graph route's own probe (:class:`~nepenthe.entropy.probes._ProbedActivation`, fused where it can be).

Calls inside a module that the tracer keeps whole (a leaf: the activation modules, whose sites the
hook route counts, and torch.nn's composite layers, which the graph does not see into either) are
not counted. A call that the structure graph does not hold, or one of a different rectifier, raises
:class:`~nepenthe.errors.MeasureError` rather than being counted under another site's name; so does
a graph call site that the first forward never reached.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from ..activations import _FUNCTIONS, _METHODS, call_is_inplace, fused_kind, rectifier_of_call
from ..errors import MeasureError
from ..graph import Site, _Tracer, find_sites, trace
from .probes import _Accumulator, _FusedCall, _ProbedActivation, _site_infos
from .stats import EntropyOptions, SiteInfo

__all__ = ["functional_probes"]

# the objects a TorchFunctionMode receives for the calls the graph route recognises
_RECTIFIER_CALLS = frozenset([*_FUNCTIONS, *(getattr(torch.Tensor, name) for name in _METHODS)])


def _owner(site: Site) -> str:
    """The qualified name of the module whose forward made a graph call (``""``: the root's)."""
    stack = site.node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _function_name(site: Site) -> str:
    target = site.node.target
    return target if isinstance(target, str) else target.__name__


def _as_node_call(func: Callable) -> tuple[str, object]:
    """(fx op, target) of a function as the tracer records it: a Tensor method is a call_method."""
    name = func.__name__
    if getattr(torch.Tensor, name, None) is func:
        return "call_method", name
    return "call_function", func


def functional_probes(model: nn.Module, accs: dict[str, _Accumulator], options: EntropyOptions,
                      channel_dims: Mapping[str, int], nonfinite_log: list) -> _FunctionalProbes | None:
    """Probes for the functional call sites of ``model``'s structure-only trace (their accumulators
    join ``accs`` as they are first called); None when it has no functional site. Raises TraceError
    when it cannot be traced."""
    gm = trace(model, "naming functional rectifier calls", structure_only=True)
    sites = [s for s in find_sites(gm) if s.node.op != "call_module"]
    if not sites:
        return None
    return _FunctionalProbes(model, sites, accs, options, channel_dims, nonfinite_log)


class _FunctionalProbes:
    """Counts the functional rectifier calls of the model's own forward under the names of the
    structure graph's call sites (see the module docstring)."""

    def __init__(self, model: nn.Module, sites: list[Site], accs: dict[str, _Accumulator], options: EntropyOptions,
                 channel_dims: Mapping[str, int], nonfinite_log: list):
        self.model, self.accs = model, accs
        self.own: dict[str, _Accumulator] = {}  # put in ``accs`` at their first call: execution order, as the graph's
        self.sites: dict[tuple[str, str, int], Site] = {}  # (owner, function, k-th call in it) -> site
        counted: dict[tuple[str, str], int] = {}
        for site in sites:
            base = (_owner(site), _function_name(site))
            k = counted.get(base, 0)
            counted[base] = k + 1
            self.sites[(*base, k)] = site
            self.own[site.name] = _Accumulator(site.name, site.rectifier, channel_dims.get(site.name, site.channel_dim),
                                           options, nonfinite_log)
        self.infos: dict[str, SiteInfo] = _site_infos(sites)
        self.probes: dict[str, _ProbedActivation] = {}  # site name -> its probe, made at its first call
        self.calls: dict[tuple[str, str], int] = {}  # (owner, function) -> calls so far in this forward
        self.reached: set[str] = set()
        self.stack: list[str] = []  # paths of the modules running, innermost last
        self.in_leaf = 0  # leaf modules among them
        self.forwards = 0
        self.mode = _RectifierMode(self)
        tracer = _Tracer()
        self.handles = []
        for path, module in model.named_modules():  # one path per module object: the tracer's (first) one
            leaf = bool(path) and tracer.is_leaf_module(module, path)
            self.handles.append(module.register_forward_pre_hook(self._enter(path, leaf)))
            self.handles.append(module.register_forward_hook(self._leave(leaf), always_call=True))

    def _enter(self, path: str, leaf: bool):
        def hook(module, args):
            if not path:  # the root: a new forward
                self.calls.clear()
                self.stack.clear()
                self.in_leaf = 0
            self.stack.append(path)
            self.in_leaf += leaf
        return hook

    def _leave(self, leaf: bool):
        def hook(module, args, out):
            if self.stack:
                self.stack.pop()
                self.in_leaf -= leaf
        return hook

    def __call__(self, *args, **kwargs):
        """The model's forward with the functional calls counted."""
        with self.mode:
            out = self.model(*args, **kwargs)
        self.forwards += 1
        if self.forwards == 1:
            self._check_all_reached()
        return out

    def _check_all_reached(self) -> None:
        missed = [s.name for s in self.sites.values() if s.name not in self.reached]
        if missed:
            raise MeasureError(
                f"the forward of {type(self.model).__name__} did not call the functional rectifier(s) {missed[:4]} "
                "that its torch.fx structure graph holds; their calls cannot be told apart from the others, so "
                "they cannot be measured under the graph's names (make the forward free of data-dependent "
                "control flow, or use activation modules, e.g. nn.ReLU, there)")

    def count(self, func: Callable, args: tuple, kwargs: dict):
        """One intercepted call: counted at its site, or run unchanged when it is no graph call site."""
        if not self.stack or self.in_leaf:  # outside the forward (a hook), or inside a leaf module
            return func(*args, **kwargs)
        op, target = _as_node_call(func)
        rect = rectifier_of_call(op, target, args, kwargs)
        if rect is None:  # e.g. a tensor negative_slope: not a rectifier for the graph route either
            return func(*args, **kwargs)
        owner, name = self.stack[-1], func.__name__
        k = self.calls.get((owner, name), 0)
        self.calls[(owner, name)] = k + 1
        site = self.sites.get((owner, name, k))
        where = f"call {k} of {name}() in the forward of {owner or 'the root module'!r}"
        if site is None:
            raise MeasureError(
                f"{where} of {type(self.model).__name__} is not a rectifier call site of its torch.fx structure "
                f"graph (which has {sorted(s.name for s in self.sites.values())[:6]}); measure cannot name it as "
                "on the unsharded model. Make the forward free of data-dependent control flow, or use an "
                "activation module (e.g. nn.ReLU) there.")
        if site.rectifier != rect:
            raise MeasureError(f"{where} computes {rect}, but the structure graph's call site {site.name!r} there "
                               f"computes {site.rectifier}: the forward does not run as it was traced")
        self.reached.add(site.name)
        if not args and "input" in kwargs:  # F.relu(input=z): the probe takes the tensor first
            kwargs = dict(kwargs)
            args = (kwargs.pop("input"),)
        probe = self.probes.get(site.name)
        if probe is None:
            acc = self.accs[site.name] = self.own[site.name]
            kind = fused_kind(site.rectifier)
            inplace = call_is_inplace(op, target, args, kwargs)
            probe = self.probes[site.name] = _ProbedActivation(
                acc, func, _FusedCall(acc, kind, inplace) if kind is not None else None)
        return probe.forward(*args, **kwargs)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class _RectifierMode(TorchFunctionMode):
    """Hands every recognised rectifier function to the probes; everything else runs unchanged."""

    def __init__(self, probes: _FunctionalProbes):
        super().__init__()
        self.probes = probes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            hit = func in _RECTIFIER_CALLS
        except TypeError:  # an unhashable callable is no rectifier
            hit = False
        return self.probes.count(func, args, kwargs) if hit else func(*args, **kwargs)
