"""Probes: what runs at each rectifier call site while measuring.

* :class:`_Accumulator` keeps one call site's running histogram (pooled estimator) or its
  per-batch counts (batch_mean), and checks NaN/Inf;
* the fx route rewrites a trace so that every call goes through a :class:`_ProbedActivation`
  (fused activation + histogram where the activation has a fused op); the probed trace is kept per
  model (:class:`_ProbedGraph`) while the model's structure key is unchanged;
* the hook route (untraceable models, :class:`~nepenthe.entropy.StatsRecorder`) overrides the
  forward of stock activation modules or adds forward pre-hooks.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from .. import ops
from ..activations import LINEAR_MODULES, Rectifier, call_is_inplace, fused_kind, rectifier_of_module
from ..errors import MeasureError, NonFiniteActivationError
from ..graph import Site, call_site_name, default_channel_dim, find_sites, trace
from ..structure import StructureKey, structure_key
from .stats import EntropyOptions, SiteInfo

__all__ = ["clear_trace_cache"]


class _Accumulator:
    """Histogram (and, for the batch-mean estimator, per-batch entropy sums) of one call site.

    Counts are kept with a fifth NONFINITE column, filled by the same kernel pass, so NaN/Inf
    inputs are refused without reading the activation again. With a ``nonfinite_log`` (a list
    shared by all call sites of one ``measure``) that check is deferred to the end of the batch:
    one host sync per batch instead of one per call site.
    """

    def __init__(self, name: str, rectifier: Rectifier, channel_dim: int | None, options: EntropyOptions,
                 nonfinite_log: list | None = None):
        self.name, self.rectifier, self.channel_dim, self.options = name, rectifier, channel_dim, options
        self.nonfinite_log = nonfinite_log
        self.hist: torch.Tensor | None = None
        self.batch_neuron_sum: torch.Tensor | None = None
        self.batch_layer_sum = 0.0
        self.batches = 0
        self.batch_index = 0  # set by the caller for error messages
        self.logged = False  # the running histogram is in nonfinite_log for this batch

    def prepare(self, z: torch.Tensor) -> int:
        """Check that ``z`` can be measured; returns its neuron dimension."""
        if self.channel_dim is None:
            self.channel_dim = default_channel_dim(z.dim())
        if z.dim() == 0:
            raise MeasureError(f"rectifier {self.name!r} received a scalar; it has no neurons to measure")
        if not torch.is_floating_point(z):
            raise MeasureError(f"rectifier {self.name!r} received a {z.dtype} tensor; expected floating point")
        return self.channel_dim

    def update(self, z: torch.Tensor) -> None:
        """Count ``z`` (the unfused route: the activation itself runs afterwards)."""
        dim = self.prepare(z)
        if self.options.estimator == "batch_mean":  # needs each call's own counts
            self.add(ops.sign_histogram(z, dim, self.rectifier.upper, bins=5), z.shape)
            return
        ops.accumulate_sign_histogram_(self.running(z, dim), z, dim, self.rectifier.upper)
        self.counted()

    def fused(self, x: torch.Tensor, kind: str, inplace: bool) -> torch.Tensor:
        """``φ(x)`` through the fused activation + histogram op, counting ``x`` in the same pass."""
        dim = self.prepare(x)
        slope = self.rectifier.off_slope
        # batch_mean needs each call's own counts; a training forward needs the differentiable op
        if self.options.estimator == "batch_mean" or (x.requires_grad and torch.is_grad_enabled()):
            if inplace:
                batch = torch.zeros(x.shape[dim], 5, dtype=torch.int64, device=x.device)
                y = ops.activation_histogram_(x, batch, kind, dim, negative_slope=slope)
            else:
                y, batch = ops.activation_histogram(x, kind, dim, negative_slope=slope, bins=5)
            self.add(batch, x.shape)
            return y
        # pooled: the kernel adds straight into the running histogram (no per-call buffer to add)
        hist = self.running(x, dim)
        if inplace:
            y = ops.activation_histogram_(x, hist, kind, dim, negative_slope=slope)
        else:
            y = ops.accumulate_activation_histogram(x, hist, kind, dim, negative_slope=slope)
        self.counted()
        return y

    def running(self, z: torch.Tensor, dim: int) -> torch.Tensor:
        """The running int64[C, 5] histogram, allocated on the first call, for an input ``z``."""
        channels = z.shape[dim]
        if self.hist is None:
            self.hist = torch.zeros(channels, 5, dtype=torch.int64, device=z.device)
        elif self.hist.shape[0] != channels:
            self._raise_channels(channels, z.shape)
        return self.hist

    def counted(self) -> None:
        """After counting into the running histogram: check (or schedule the check) for NaN/Inf."""
        self.batches += 1
        if self.nonfinite_log is None:
            self.raise_if_nonfinite(self.hist[:, ops.NONFINITE].sum())
        elif not self.logged:  # the running total is checked once, at the end of the batch
            self.logged = True
            self.nonfinite_log.append((self, None))

    def _raise_channels(self, channels: int, shape: tuple) -> None:
        raise MeasureError(
            f"rectifier {self.name!r} had {self.hist.shape[0]} neurons and now {channels} "
            f"(input shape {tuple(shape)}, neuron dim {self.channel_dim}); pass channel_dims="
            f"{{{self.name!r}: <dim>}} to measure if the neuron dimension is not the default"
        )

    def add(self, batch_hist: torch.Tensor, shape: tuple) -> None:
        """Add one call's int64[C, 5] counts (input of shape ``shape``)."""
        if self.nonfinite_log is None:
            self.raise_if_nonfinite(batch_hist[:, ops.NONFINITE].sum())
        else:
            self.nonfinite_log.append((self, batch_hist[:, ops.NONFINITE].sum()))
        if self.hist is None:
            self.hist = torch.zeros_like(batch_hist)
        elif self.hist.shape != batch_hist.shape:
            self._raise_channels(batch_hist.shape[0], shape)
        self.hist += batch_hist
        if self.options.estimator == "batch_mean":
            neuron, layer = ops.entropy_from_histogram(self.options.entropy_view(batch_hist), self.options.zero_as,
                                                       self.options.aggregate)
            self.batch_neuron_sum = neuron if self.batch_neuron_sum is None else self.batch_neuron_sum + neuron
            self.batch_layer_sum += float(layer)
        self.batches += 1

    def raise_if_nonfinite(self, count: torch.Tensor) -> None:
        bad = int(count)
        if bad:
            raise NonFiniteActivationError(
                f"the input of rectifier {self.name!r} holds {bad} NaN/Inf value(s) (batch "
                f"{self.batch_index}); its sign is undefined. Check the model's weights and inputs "
                "(a diverged training run, unnormalised data, a bad checkpoint) before measuring."
            )

    def counts(self) -> torch.Tensor:
        """The int64[C, 4] histogram (ON, OFF, ZERO, SAT) that EntropyStats keeps."""
        return self.hist[:, : ops.NUM_STATES].contiguous()


def _check_nonfinite(log: list) -> None:
    """Raise for the first call site (in execution order) of the batch that saw NaN/Inf.

    Entries are (accumulator, that call's NaN/Inf count), or (accumulator, None) for a running
    histogram, whose total is checked (it was 0 after the previous batch, or measure raised).
    """
    if log:
        running = [acc.hist for acc, count in log if count is None]
        per_call = [count for _, count in log if count is not None]
        total = torch.cat(running)[:, ops.NONFINITE].sum() if running else 0  # one op for all call sites
        if per_call:
            total = total + torch.stack(per_call).sum()
        if int(total):
            for acc, count in log:
                acc.raise_if_nonfinite(acc.hist[:, ops.NONFINITE].sum() if count is None else count)
        for acc, _ in log:
            acc.logged = False
    log.clear()


class _FusedCall:
    """Runs one rectifier call through the fused activation + histogram op (one read of its input)."""

    def __init__(self, acc: _Accumulator, kind: str, inplace: bool):
        self.acc, self.kind, self.inplace = acc, kind, inplace

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.fused(x, self.kind, self.inplace)


class _ProbedActivation(nn.Module):
    """Replaces one activation call in a traced graph: counts its input and applies it, fused when
    the activation has a fused op (else counts, then calls the original)."""

    def __init__(self, acc: _Accumulator, fn: Callable, fused: _FusedCall | None):
        super().__init__()
        self.acc, self.fn, self.fused = acc, fn, fused

    def forward(self, x, *args, **kwargs):
        if self.fused is not None and not (x.requires_grad and torch.is_grad_enabled()):
            return self.fused(x)  # extra args (slope, inplace, approximate) are already in the Rectifier
        self.acc.update(x.detach())
        return self.fn(x, *args, **kwargs)


def _call_of(gm: fx.GraphModule, node: fx.Node) -> Callable:
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    if node.op == "call_method":
        name = node.target
        return lambda x, *a, **k: getattr(x, name)(*a, **k)
    return node.target


def _probe_graph(gm: fx.GraphModule, sites: list[Site]) -> list[_ProbedActivation]:
    """Route every rectifier call of ``gm`` through a probe module (in place); the probes, in site
    order, have no accumulator yet (see :meth:`_ProbedGraph.bind`)."""
    probes = []
    for i, site in enumerate(sites):
        node = site.node
        probe_name = f"_nepenthe_probe_{i}"
        kind = fused_kind(site.rectifier)
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        inplace = call_is_inplace(node.op, node.target, node.args, node.kwargs, module)
        fused = _FusedCall(None, kind, inplace) if kind is not None else None
        probe = _ProbedActivation(None, _call_of(gm, node), fused)
        gm.add_submodule(probe_name, probe)
        probes.append(probe)
        args, kwargs = node.args, dict(node.kwargs)
        if not args and "input" in kwargs:  # F.relu(input=z): the probe takes the tensor first
            args = (kwargs.pop("input"),)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(probe_name, args, kwargs)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.recompile()
    return probes


@dataclass
class _ProbedGraph:
    """A traced, probed copy of a model's forward, kept for the next ``measure`` of the same model.

    Tracing and probing cost ~10 ms for a ResNet-18 on CPU, as much as a batch-1 forward; pruning
    measures the same model every iteration with only its weights changed. The graph is reused
    while the model's :func:`~nepenthe.structure.structure_key` is unchanged (same modules,
    parameters and buffers as objects, same plain attributes), and re-traced otherwise.
    """

    key: StructureKey
    gm: fx.GraphModule
    sites: list[Site]
    infos: dict[str, SiteInfo]
    probes: list[_ProbedActivation]
    busy: bool = False

    def bind(self, accs: Mapping[str, _Accumulator]) -> None:
        """Point the probes at this call's accumulators (an empty mapping unbinds them)."""
        for site, probe in zip(self.sites, self.probes, strict=True):
            probe.acc = accs.get(site.name)
            if probe.fused is not None:
                probe.fused.acc = probe.acc


# model -> its last probed graph; weak keys: the cache never keeps a model alive (the graph holds
# the model's submodules, never the model itself)
_PROBED_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def clear_trace_cache() -> None:
    """Forget every kept trace (``measure`` re-traces each model on its next call)."""
    _PROBED_GRAPHS.clear()


def _probed_graph(model: nn.Module) -> _ProbedGraph | None:
    """The probed graph of ``model`` (reused when its structure is unchanged); None when the model
    has no rectifier call site in its trace. Raises TraceError when it cannot be traced."""
    key = structure_key(model)
    kept = _PROBED_GRAPHS.get(model)
    if kept is not None and not kept.busy and kept.key.matches(key):
        return kept
    gm = trace(model, "measuring functional activations")
    if gm is model:  # never rewrite the caller's GraphModule: probe a copy that shares its submodules
        gm = fx.GraphModule(model, copy.deepcopy(model.graph))
    sites = find_sites(gm)
    if not sites:
        return None
    infos = _site_infos(sites)
    probed = _ProbedGraph(key, gm, sites, infos, _probe_graph(gm, sites))
    if kept is None or not kept.busy:  # a nested measure of the same model keeps its own graph
        _PROBED_GRAPHS[model] = probed
    return probed


class _HookProbes:
    """Forward pre-hooks on activation modules; names call sites as the graph route does."""

    def __init__(self, model: nn.Module, accs: dict[str, _Accumulator], options: EntropyOptions,
                 infos: Mapping[str, SiteInfo] | None, channel_dims: Mapping[str, int]):
        self.model, self.accs, self.options = model, accs, options
        self.infos, self.channel_dims = infos or {}, channel_dims
        self.calls: dict[str, int] = {}
        self.handles = []
        self.batch_index = 0
        self.overridden: list[nn.Module] = []
        self.hooked = 0  # rectifier modules with a pre-hook
        # Which Conv/Linear feeds each call site, without a graph: during the first forward every
        # Conv/Linear output is remembered by identity, and a rectifier whose input is that very
        # tensor names it as producer (site_infos). Only the first forward: the outputs are kept alive.
        self.producers: dict[str, str] = {}
        self.paths: dict[str, tuple[str, Rectifier]] = {}  # call site -> (module path, its rectifier)
        self._outputs: dict[int, tuple[str, torch.Tensor, int]] = {}  # id -> (path, output, its neuron dim)
        self._output_handles = [m.register_forward_hook(self._remember_output(p, -1 if isinstance(m, nn.Linear) else 1))
                                for p, m in model.named_modules() if isinstance(m, LINEAR_MODULES)]
        self._forwards = 0
        # one probe per module object, named by its first path as fx names it; remove_duplicate=False
        # would probe a module shared under several names once per alias and count every call repeatedly
        for path, module in model.named_modules():
            rect = rectifier_of_module(module)
            if rect is None:
                continue
            kind = fused_kind(rect)
            if kind is not None and type(module).forward in _STOCK_FORWARDS and "forward" not in module.__dict__:
                module.forward = self._fused_forward(module, path, rect, kind)  # instance attribute, undone in remove
                self.overridden.append(module)
            else:  # a subclass with its own forward: count its input, let it run unchanged
                self.handles.append(module.register_forward_pre_hook(self._hook(path, rect)))
                self.hooked += 1
        self.handles.append(model.register_forward_pre_hook(self._reset))

    @property
    def found_any(self) -> bool:
        return bool(self.overridden) or self.hooked > 0

    def _reset(self, module, args):
        self.calls.clear()
        self._forwards += 1
        if self._forwards == 2:  # producers are known from the first forward
            self._stop_remembering()

    def _remember_output(self, path: str, neuron_dim: int):
        def hook(module, args, out):
            if isinstance(out, torch.Tensor):
                self._outputs[id(out)] = (path, out, neuron_dim)
        return hook

    def _stop_remembering(self) -> None:
        for h in self._output_handles:
            h.remove()
        self._output_handles.clear()
        self._outputs.clear()

    def site_infos(self) -> dict[str, SiteInfo]:
        """Module path and, where the first forward showed it, the producing Conv/Linear of each call
        site (the rectifier and channel dim come from the accumulators)."""
        return {name: SiteInfo(rect, None, self.producers.get(name), path)
                for name, (path, rect) in self.paths.items()}

    def _acc_for_call(self, path: str, rect: Rectifier, x: torch.Tensor | None = None) -> _Accumulator:
        """The accumulator of this call of the module at ``path`` (``path``, ``path#1``, ...)."""
        index = self.calls.get(path, 0)
        self.calls[path] = index + 1
        name = call_site_name(path, index)
        producer_dim = None
        if name not in self.paths:
            self.paths[name] = (path, rect)
            hit = self._outputs.get(id(x)) if x is not None else None
            if hit is not None and hit[1] is x:
                self.producers[name], producer_dim = hit[0], hit[2]
        acc = self.accs.get(name)
        if acc is None:
            info = self.infos.get(name)
            dim = self.channel_dims.get(name, info.channel_dim if info else None)
            if dim is None:  # fed by a Linear: its output features (the last dim of [B, T, C] tokens)
                dim = producer_dim
            acc = self.accs[name] = _Accumulator(name, rect, dim, self.options)
        acc.batch_index = self.batch_index
        return acc

    def _hook(self, path: str, rect: Rectifier):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor):
                self._acc_for_call(path, rect, args[0]).update(args[0].detach())
        return hook

    def _fused_forward(self, module: nn.Module, path: str, rect: Rectifier, kind: str):
        inplace = call_is_inplace("call_module", None, (), {}, module)
        stock_forward = type(module).forward

        def forward(x):
            acc = self._acc_for_call(path, rect, x)
            if inplace and x.requires_grad and torch.is_grad_enabled():
                # an inplace activation inside autograd stays PyTorch's own op (counted separately)
                acc.update(x.detach())
                return stock_forward(module, x)
            return _FusedCall(acc, kind, inplace)(x)
        return forward

    def remove(self) -> None:
        self._stop_remembering()
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for module in self.overridden:
            module.__dict__.pop("forward", None)
        self.overridden.clear()


# forward methods of the activation modules that the fused op reproduces exactly
_STOCK_FORWARDS = (nn.ReLU.forward, nn.Hardtanh.forward, nn.LeakyReLU.forward, nn.GELU.forward, nn.SiLU.forward,
                   nn.Hardswish.forward)




def _site_infos(sites: list[Site]) -> dict[str, SiteInfo]:
    return {s.name: SiteInfo(s.rectifier, s.channel_dim, s.producer, s.module_path) for s in sites}


