"""Layer 2: per-neuron sign statistics of every rectifier, and the entropies derived from them.

``measure(model, data)`` runs the model over a calibration set with a probe at every rectifier call
site and returns :class:`EntropyStats`. Probes are placed on a torch.fx trace of the model, which
sees module and functional activations alike; an untraceable model falls back to forward
pre-hooks on activation modules (functional activations are then invisible, and a warning says
so). :class:`StatsRecorder` uses the same pre-hooks on the live model, so statistics can be
gathered while it trains.

Pre-hooks see the activation's input before the module runs, so inplace activations are measured
correctly, and a call counter per forward pass tells apart several call sites of one module.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn

from . import ops
from .activations import Rectifier, call_is_inplace, fused_kind, rectifier_of_module
from .graph import Site, TraceError, call_site_name, default_channel_dim, find_sites, trace
from .structure import StructureKey, structure_key

ESTIMATORS = ("pooled", "batch_mean")


class MeasureError(ValueError):
    """The model or data cannot be measured (no rectifier, no data, ...)."""


class NonFiniteActivationError(MeasureError):
    """A rectifier received NaN or Inf values."""


@dataclass
class EntropyOptions:
    """How histograms become entropies (SPEC §1). Defaults are the project's decisions."""

    zero_as: str = "exclude"
    aggregate: str = "mean"
    estimator: str = "pooled"
    # ReLU6's upper kink as a state of its own (three regions: OFF, linear, saturated), so that zero
    # entropy means "affine on the data". False: the two-state ON/OFF entropy of the EGP and EASIER
    # code, where a saturated neuron counts as ON. Only the entropies change: the histograms keep
    # the SAT counts, so folding still sees which neurons saturate.
    saturation: bool = True

    def entropy_view(self, hist: torch.Tensor) -> torch.Tensor:
        """The histogram the entropies are computed from: ``hist`` itself, or with the SAT counts
        folded back into ON (SAT is a subset of ON) for the two-state convention."""
        if self.saturation or hist.shape[1] <= ops.SAT:
            return hist
        hist = hist.clone()
        hist[:, ops.SAT] = 0
        return hist

    def __post_init__(self):
        if self.zero_as not in ops.ZERO_AS:
            raise ValueError(f"zero_as must be one of {ops.ZERO_AS}, got {self.zero_as!r}")
        if self.aggregate not in ops.AGGREGATES:
            raise ValueError(f"aggregate must be one of {ops.AGGREGATES}, got {self.aggregate!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if not isinstance(self.saturation, bool):
            raise ValueError(f"saturation must be True or False, got {self.saturation!r}")


@dataclass
class SiteInfo:
    """What is known about one call site besides its counts."""

    rectifier: Rectifier
    channel_dim: int
    producer: str | None = None  # the Conv/Linear feeding it (the prunable layer), if known
    module_path: str | None = None


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
        self.handles.append(model.register_forward_pre_hook(self._reset))

    @property
    def found_any(self) -> bool:
        return bool(self.overridden) or len(self.handles) > 1

    def _reset(self, module, args):
        self.calls.clear()

    def _acc_for_call(self, path: str, rect: Rectifier) -> _Accumulator:
        """The accumulator of this call of the module at ``path`` (``path``, ``path#1``, ...)."""
        index = self.calls.get(path, 0)
        self.calls[path] = index + 1
        name = call_site_name(path, index)
        acc = self.accs.get(name)
        if acc is None:
            info = self.infos.get(name)
            dim = self.channel_dims.get(name, info.channel_dim if info else None)
            acc = self.accs[name] = _Accumulator(name, rect, dim, self.options)
        acc.batch_index = self.batch_index
        return acc

    def _hook(self, path: str, rect: Rectifier):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor):
                self._acc_for_call(path, rect).update(args[0].detach())
        return hook

    def _fused_forward(self, module: nn.Module, path: str, rect: Rectifier, kind: str):
        inplace = call_is_inplace("call_module", None, (), {}, module)
        stock_forward = type(module).forward

        def forward(x):
            acc = self._acc_for_call(path, rect)
            if inplace and x.requires_grad and torch.is_grad_enabled():
                # an inplace activation inside autograd stays PyTorch's own op (counted separately)
                acc.update(x.detach())
                return stock_forward(module, x)
            return _FusedCall(acc, kind, inplace)(x)
        return forward

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for module in self.overridden:
            module.__dict__.pop("forward", None)
        self.overridden.clear()


# forward methods of the activation modules that the fused op reproduces exactly
_STOCK_FORWARDS = (nn.ReLU.forward, nn.Hardtanh.forward, nn.LeakyReLU.forward, nn.GELU.forward, nn.SiLU.forward,
                   nn.Hardswish.forward)


@dataclass
class EntropyStats:
    """Sign histograms of every rectifier call site and everything derived from them.

    All dicts are keyed by call-site name (see :mod:`nepenthe.graph`). ``histogram[name]`` is
    int64[C, 4] (ON, OFF, ZERO, SAT); counts add up across batches and processes.
    """

    histogram: dict[str, torch.Tensor]
    sites: dict[str, SiteInfo]
    options: EntropyOptions = field(default_factory=EntropyOptions)
    batch_neuron_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    batch_layer_sum: dict[str, float] = field(default_factory=dict)
    batches: int = 0

    # ----- entropies -------------------------------------------------------------------------
    @property
    def neuron_entropy(self) -> dict[str, torch.Tensor]:
        """Per-neuron entropy in bits, float64[C] per call site."""
        if self.options.estimator == "batch_mean":
            return {k: self.batch_neuron_sum[k] / max(self.batches, 1) for k in self.histogram}
        return {k: ops.neuron_entropy_from_histogram(self.options.entropy_view(h), self.options.zero_as)
                for k, h in self.histogram.items()}

    @property
    def layer_entropy(self) -> dict[str, float]:
        """One entropy per call site, aggregated over its neurons as ``options.aggregate`` says."""
        if self.options.estimator == "batch_mean":
            return {k: self.batch_layer_sum[k] / max(self.batches, 1) for k in self.histogram}
        return {k: ops.aggregate_layer_entropy(v, self.options.aggregate) for k, v in self.neuron_entropy.items()}

    # ----- neuron states (always from pooled counts: they are facts about the data) -----------
    @property
    def always_off(self) -> dict[str, torch.Tensor]:
        """bool[C]: neurons never ON (only OFF or exactly zero) on the data."""
        return {k: h[:, ops.ON] == 0 for k, h in self.histogram.items()}

    @property
    def always_on(self) -> dict[str, torch.Tensor]:
        """bool[C]: neurons never OFF and never saturated, with at least one ON observation."""
        return {
            k: (h[:, ops.OFF] == 0) & (h[:, ops.SAT] == 0) & (h[:, ops.ON] > 0) for k, h in self.histogram.items()
        }

    @property
    def always_saturated(self) -> dict[str, torch.Tensor]:
        """bool[C]: neurons whose input was always at or above the upper kink (constant output)."""
        return {k: (h[:, ops.SAT] == h.sum(1) - h[:, ops.SAT]) & (h[:, ops.SAT] > 0) for k, h in self.histogram.items()}

    def linearizable(self, name: str) -> bool:
        """True when the rectifier is affine on every neuron of this call site over the data."""
        return bool((self.always_off[name] | self.always_on[name] | self.always_saturated[name]).all())

    @property
    def zero_entropy_layers(self) -> list[str]:
        """Call sites whose layer entropy is exactly 0 (SPEC: linearizable layers)."""
        return [k for k, v in self.layer_entropy.items() if v == 0.0]

    @property
    def num_samples(self) -> dict[str, int]:
        """Observations per neuron (sample positions) at each call site."""
        return {k: int(h[0, :3].sum()) if h.shape[0] else 0 for k, h in self.histogram.items()}

    # ----- combining --------------------------------------------------------------------------
    def merge_(self, other: EntropyStats) -> EntropyStats:
        """Add another run's counts (e.g. another shard of the data) into this one."""
        for k, h in other.histogram.items():
            if k in self.histogram:
                self.histogram[k] = self.histogram[k] + h.to(self.histogram[k].device)
            else:
                self.histogram[k] = h.clone()
                self.sites[k] = other.sites[k]
        for k, v in other.batch_neuron_sum.items():
            self.batch_neuron_sum[k] = self.batch_neuron_sum[k] + v if k in self.batch_neuron_sum else v.clone()
        for k, v in other.batch_layer_sum.items():
            self.batch_layer_sum[k] = self.batch_layer_sum.get(k, 0.0) + v
        self.batches += other.batches
        return self

    def all_reduce_(self, group=None) -> EntropyStats:
        """Sum counts over the processes of a torch.distributed group (no-op when not initialised).

        Integer counts reduce exactly, so every rank ends with identical statistics, equal to
        a one-process run over the union of the ranks' data.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        names = sorted(self.histogram)
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, names, group=group)
        if any(g != names for g in gathered):
            raise MeasureError(f"ranks measured different rectifier sets: {gathered}")
        for k in names:
            dist.all_reduce(self.histogram[k], group=group)
        if self.options.estimator == "batch_mean":
            for k in names:
                dist.all_reduce(self.batch_neuron_sum[k], group=group)
            extra = torch.tensor([self.batches] + [self.batch_layer_sum[k] for k in names], dtype=torch.float64,
                                 device=self.histogram[names[0]].device if names else "cpu")
            dist.all_reduce(extra, group=group)
            self.batches = int(extra[0])
            self.batch_layer_sum = {k: float(v) for k, v in zip(names, extra[1:].tolist())}
        return self

    # ----- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain tensors and JSON-able values, loadable with ``torch.load(weights_only=True)``."""
        return {
            "histogram": {k: v.cpu() for k, v in self.histogram.items()},
            "sites": {k: {"kind": s.rectifier.kind, "upper": s.rectifier.upper, "off_slope": s.rectifier.off_slope,
                          "exact": s.rectifier.exact, "approximate": s.rectifier.approximate,
                          "channel_dim": s.channel_dim, "producer": s.producer, "module_path": s.module_path}
                      for k, s in self.sites.items()},
            "options": vars(self.options).copy(),
            "batch_neuron_sum": {k: v.cpu() for k, v in self.batch_neuron_sum.items()},
            "batch_layer_sum": dict(self.batch_layer_sum),
            "batches": self.batches,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> EntropyStats:
        sites = {}
        for k, s in state["sites"].items():
            rect = Rectifier(s["kind"], s["upper"], s["off_slope"], s["exact"], s["approximate"])
            sites[k] = SiteInfo(rect, s["channel_dim"], s["producer"], s["module_path"])
        return cls(dict(state["histogram"]), sites, EntropyOptions(**state["options"]),
                   dict(state["batch_neuron_sum"]), dict(state["batch_layer_sum"]), int(state["batches"]))

    def summary(self) -> dict[str, dict]:
        """Per call site: neurons, entropy, always-ON/OFF counts (for reports)."""
        ent, off, on, sat = self.layer_entropy, self.always_off, self.always_on, self.always_saturated
        return {
            k: {"neurons": int(h.shape[0]), "entropy": ent[k], "always_off": int(off[k].sum()),
                "always_on": int(on[k].sum()), "always_saturated": int(sat[k].sum()),
                "producer": self.sites[k].producer}
            for k, h in self.histogram.items()
        }


def _batch_call(batch, input_fn: Callable | None):
    """(args, kwargs) for the model from one batch of the calibration data."""
    if input_fn is not None:
        out = input_fn(batch)
        return ((out,), {}) if isinstance(out, torch.Tensor) else (tuple(out), {})
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return (batch[0],), {}
    raise MeasureError(
        f"cannot tell the model's input from a batch of type {type(batch).__name__}; pass input_fn=lambda b: ..."
    )


def _to_device(obj, device):
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _model_device(model: nn.Module):
    for p in model.parameters():
        return p.device
    return None


def _rectifier_hint(model: nn.Module, trace_error: Exception | None) -> str:
    msg = (f"no rectifier found in {type(model).__name__}: nepenthe measures nn.ReLU, ReLU6, LeakyReLU, GELU, SiLU "
           "and Hardswish modules, and F.relu-style functional calls in torch.fx-traceable models")
    if trace_error is not None:
        msg += f" (this model could not be traced, so functional activations were not visible: {trace_error})"
    return msg + ". Pass a model that has rectifier activations."


def _hook_probes_or_raise(model: nn.Module, accs: dict, options: EntropyOptions, channel_dims: Mapping[str, int],
                          cause: Exception | None, infos: Mapping[str, SiteInfo] | None = None) -> _HookProbes:
    """Forward pre-hooks on the model's activation modules; MeasureError when it has none."""
    hooks = _HookProbes(model, accs, options, infos, channel_dims)
    if not hooks.found_any:
        hooks.remove()
        raise MeasureError(_rectifier_hint(model, cause)) from cause
    return hooks


def _site_infos(sites: list[Site]) -> dict[str, SiteInfo]:
    return {s.name: SiteInfo(s.rectifier, s.channel_dim, s.producer, s.module_path) for s in sites}


def describe_sites(model: nn.Module) -> dict[str, SiteInfo]:
    """The rectifier call sites of a traceable model, without running it."""
    return _site_infos(find_sites(trace(model, "finding rectifier call sites")))


@torch.no_grad()
def measure(
    model: nn.Module,
    data: Iterable,
    *,
    zero_as: str = "exclude",
    aggregate: str = "mean",
    estimator: str = "pooled",
    saturation: bool = True,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    input_fn: Callable | None = None,
    channel_dims: Mapping[str, int] | None = None,
    distributed: bool | str = "auto",
    progress: bool = False,
) -> EntropyStats:
    """Sign histograms and entropies of every rectifier of ``model`` over ``data`` (SPEC §1).

    ``data`` yields batches: a tensor, a tuple/list whose first element is the input (labels are
    ignored), a dict passed as keyword arguments, or anything ``input_fn(batch)`` turns into the
    model's positional input(s). The model runs in eval mode without gradients; its mode is
    restored afterwards. ``channel_dims`` overrides the neuron dimension of given call sites.
    ``saturation=False`` gives ReLU6 the two-state (ON/OFF) entropy of the EGP/EASIER code instead
    of the three-region one (the histograms are the same either way).
    With ``distributed="auto"`` the counts are summed over all ranks when torch.distributed is
    initialised.
    """
    options = EntropyOptions(zero_as, aggregate, estimator, saturation)
    channel_dims = dict(channel_dims or {})
    device = torch.device(device) if device is not None else _model_device(model)
    accs: dict[str, _Accumulator] = {}
    trace_error = None
    # eval mode before tracing: fx bakes `self.training` (e.g. of F.dropout) into the graph as a constant
    was_training = model.training
    model.eval()
    probed = None
    try:
        probed = _probed_graph(model)
    except TraceError as exc:
        trace_error = exc
    nonfinite_log: list = []
    if probed is not None:
        infos = probed.infos
        for s in probed.sites:
            accs[s.name] = _Accumulator(s.name, s.rectifier, channel_dims.get(s.name, s.channel_dim), options,
                                        nonfinite_log)
        probed.bind(accs)
        probed.busy = True
        runner, hooks = probed.gm, None
    else:
        infos = {}
        try:
            hooks = _hook_probes_or_raise(model, accs, options, channel_dims, trace_error)
        except MeasureError:
            model.train(was_training)
            raise
        if trace_error is not None:
            warnings.warn(f"{trace_error} Measuring activation modules only, through forward hooks.", stacklevel=2)
        runner = model

    batches = 0
    try:
        iterator = data
        if progress:
            from .progress import progress_bar
            iterator = progress_bar(data, desc="measure")
        for batch in iterator:
            if max_batches is not None and batches >= max_batches:
                break
            for acc in accs.values():
                acc.batch_index = batches
            if hooks is not None:
                hooks.batch_index = batches
            args, kwargs = _to_device(_batch_call(batch, input_fn), device)
            try:
                runner(*args, **kwargs)
            except MeasureError:
                raise
            except Exception as exc:
                if hooks is not None or batches > 0:
                    raise
                # The trace succeeded but does not run on real inputs (fx bakes e.g. `if mask is None`
                # into the graph): measure the module activations through hooks instead.
                warnings.warn(f"the torch.fx trace of {type(model).__name__} fails on real inputs ({exc!r}); "
                              "measuring activation modules only, through forward hooks.", stacklevel=2)
                if _PROBED_GRAPHS.get(model) is probed:
                    del _PROBED_GRAPHS[model]
                accs.clear()
                nonfinite_log.clear()
                infos = {}
                hooks = _hook_probes_or_raise(model, accs, options, channel_dims, exc)
                runner = model
                runner(*args, **kwargs)
            _check_nonfinite(nonfinite_log)
            batches += 1
    finally:
        if hooks is not None:
            hooks.remove()
        if probed is not None:
            probed.busy = False
            probed.bind({})  # the kept graph must not hold on to this call's counts
        model.train(was_training)
    if batches == 0:
        raise MeasureError("the calibration data yielded no batches; pass a non-empty iterable (e.g. a DataLoader "
                           "over the training set)")
    missing = [k for k, a in accs.items() if a.hist is None]
    if hooks is not None and not accs:
        raise MeasureError(_rectifier_hint(model, trace_error))
    for k in missing:  # a call site the data never reached (e.g. a branch not taken)
        del accs[k]
    stats = _stats_from(accs, infos, options, batches)
    if distributed is True or (distributed == "auto"):
        stats.all_reduce_()
    return stats


def _stats_from(accs: dict[str, _Accumulator], infos: Mapping[str, SiteInfo], options: EntropyOptions,
                batches: int) -> EntropyStats:
    sites = {}
    for k, a in accs.items():
        info = infos.get(k)
        sites[k] = SiteInfo(a.rectifier, a.channel_dim, info.producer if info else None,
                            info.module_path if info else None)
    stats = EntropyStats({k: a.counts() for k, a in accs.items()}, sites, options, batches=batches)
    if options.estimator == "batch_mean":
        stats.batch_neuron_sum = {k: a.batch_neuron_sum for k, a in accs.items()}
        stats.batch_layer_sum = {k: a.batch_layer_sum for k, a in accs.items()}
        # Call sites reached on only some batches are averaged over all batches, like the layer sum.
    return stats


class StatsRecorder:
    """Collect sign statistics while the model trains (or runs anything), through forward hooks.

    Use as a context manager around the training loop::

        with nepenthe.StatsRecorder(model) as rec:
            for x, y in loader: ...
        stats = rec.stats()

    Only activation *modules* are seen (functional calls need :func:`measure`). Producers and
    neuron dims come from a trace of the model when it is traceable.
    """

    def __init__(self, model: nn.Module, *, zero_as: str = "exclude", aggregate: str = "mean",
                 estimator: str = "pooled", saturation: bool = True, channel_dims: Mapping[str, int] | None = None):
        self.model = model
        self.options = EntropyOptions(zero_as, aggregate, estimator, saturation)
        self.accs: dict[str, _Accumulator] = {}
        try:
            self.infos = describe_sites(model)
        except TraceError:
            self.infos = {}
        self.channel_dims = dict(channel_dims or {})
        self._hooks: _HookProbes | None = None
        self._calls = 0

    def __enter__(self) -> StatsRecorder:
        self._hooks = _hook_probes_or_raise(self.model, self.accs, self.options, self.channel_dims, None, self.infos)
        self._counter = self.model.register_forward_pre_hook(self._count)
        return self

    def _count(self, module, args):
        if self._hooks is not None:
            self._hooks.batch_index = self._calls
        self._calls += 1

    def __exit__(self, *exc) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._counter.remove()
            self._hooks = None

    def reset(self) -> None:
        """Forget what was recorded so far (e.g. at the start of each epoch)."""
        self.accs.clear()
        self._calls = 0

    def stats(self, distributed: bool | str = "auto") -> EntropyStats:
        if self._calls == 0 or not self.accs:
            raise MeasureError("StatsRecorder saw no forward pass with a rectifier; run the model inside the `with`")
        stats = _stats_from(self.accs, self.infos, self.options, self._calls)
        if distributed is True or distributed == "auto":
            stats.all_reduce_()
        return stats
