"""``measure`` (a calibration pass over a traced, probed copy of the model) and
:class:`StatsRecorder` (the same counts gathered on the live model while it trains)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn as nn

from ..distributed import agreed, is_active
from ..errors import MeasureError
from ..graph import TraceError, find_sites, is_fully_sharded, trace
from ..mask_interop import refuse_foreign_pruning, unwrap_model
from .functional import functional_probes
from .probes import (
    _PROBED_GRAPHS,
    _Accumulator,
    _check_nonfinite,
    _HookProbes,
    _probed_graph,
    _site_infos,
)
from .stats import EntropyOptions, EntropyStats, SiteInfo

__all__ = ["describe_sites", "measure", "StatsRecorder"]


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
                          cause: Exception | None, infos: Mapping[str, SiteInfo] | None = None,
                          others: bool = False) -> _HookProbes:
    """Forward pre-hooks on the model's activation modules; MeasureError when it has none (and no
    ``others``: functional call sites counted another way)."""
    hooks = _HookProbes(model, accs, options, infos, channel_dims)
    if not hooks.found_any and not others:
        hooks.remove()
        raise MeasureError(_rectifier_hint(model, cause)) from cause
    return hooks




def describe_sites(model: nn.Module) -> dict[str, SiteInfo]:
    """The rectifier call sites of a traceable model, without running it."""
    return _site_infos(find_sites(trace(model, "finding rectifier call sites", structure_only=True)))


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
    """Sign histograms and entropies of every rectifier of ``model`` over ``data`` (docs/method.md §1).

    ``data`` yields batches: a tensor, a tuple/list whose first element is the input (labels are
    ignored), a dict passed as keyword arguments, or anything ``input_fn(batch)`` turns into the
    model's positional input(s). The model runs in eval mode without gradients; its mode is
    restored afterwards. ``channel_dims`` overrides the neuron dimension of given call sites.
    ``saturation=False`` gives ReLU6 the two-state (ON/OFF) entropy of the EGP/EASIER code instead
    of the three-region one (the histograms are the same either way).
    With ``distributed="auto"`` the counts are summed over all ranks when torch.distributed is
    initialised (every rank then holds the same statistics, equal to one process measuring the
    union of the ranks' data; a rank's shard may be smaller or hold empty batches). When measuring
    fails on some ranks, every rank raises the same :class:`nepenthe.distributed.RankError`
    instead of waiting for the others.
    """
    local = dict(zero_as=zero_as, aggregate=aggregate, estimator=estimator, saturation=saturation, device=device,
                 max_batches=max_batches, input_fn=input_fn, channel_dims=channel_dims, progress=progress)
    if (distributed is True or distributed == "auto") and is_active():
        with agreed("measure"):  # a rank that fails here must not leave the others in the reduce below
            stats = _measure_here(model, data, **local)
        stats.all_reduce_()
    else:
        stats = _measure_here(model, data, **local)
    # after the reduce, so that a rank whose shard held only empty batches is fine when others saw samples
    unseen = [k for k, n in stats.num_samples.items() if n == 0]
    if unseen and len(unseen) == len(stats.histogram):
        raise MeasureError(f"the calibration data held no samples ({stats.batches} batch(es), every one empty): no "
                           "rectifier was observed; pass batches with at least one sample")
    if unseen:
        warnings.warn(f"rectifier(s) {unseen[:4]} saw no observation (0 samples): their neurons count as unknown, "
                      "never as zero-entropy, and fold leaves them as they are", stacklevel=2)
    return stats


def _measure_here(model: nn.Module, data: Iterable, *, zero_as: str, aggregate: str, estimator: str,
                  saturation: bool, device, max_batches: int | None, input_fn: Callable | None,
                  channel_dims: Mapping[str, int] | None, progress: bool) -> EntropyStats:
    """:func:`measure` on this process's data only."""
    model = unwrap_model(model)  # torch.compile / DDP / DataParallel: the user's own module paths
    refuse_foreign_pruning(model, "measure")
    options = EntropyOptions(zero_as, aggregate, estimator, saturation)
    channel_dims = dict(channel_dims or {})
    device = torch.device(device) if device is not None else _model_device(model)
    accs: dict[str, _Accumulator] = {}
    trace_error = None
    # eval mode before tracing: fx bakes `self.training` (e.g. of F.dropout) into the graph as a constant
    was_training = model.training
    model.eval()
    probed = functional = None
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
        # FSDP2: the model's own forward runs (its root gathers the parameters); the functional calls
        # are counted in it under the names of a structure-only graph (entropy/functional.py)
        unseen_because = trace_error  # why functional calls go unmeasured, if they do
        if is_fully_sharded(model):
            try:
                functional = functional_probes(model, accs, options, channel_dims, nonfinite_log)
                unseen_because = None
            except TraceError as exc:
                unseen_because = exc
        infos = dict(functional.infos) if functional is not None else {}
        try:
            hooks = _hook_probes_or_raise(model, accs, options, channel_dims, trace_error,
                                          others=functional is not None)
        except MeasureError:
            if functional is not None:
                functional.remove()
            model.train(was_training)
            raise
        if unseen_because is not None:
            warnings.warn(f"{unseen_because} Measuring activation modules only, through forward hooks.", stacklevel=3)
        runner = functional if functional is not None else model

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
                              "measuring activation modules only, through forward hooks.", stacklevel=3)
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
        if functional is not None:
            functional.remove()
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
    if hooks is not None:  # module paths and, seen while running, the Conv/Linear feeding each site
        infos = {**hooks.site_infos(), **infos}
    return _stats_from(accs, infos, options, batches)


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
