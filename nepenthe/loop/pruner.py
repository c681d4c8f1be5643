"""The state of one run of the loop: the prunable layers, caps and the cut check, snapshots, and
the helpers pruning methods step with."""

from __future__ import annotations

import copy
import fnmatch
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from .. import budget
from .._utils import set_submodule
from ..distributed import digest
from ..entropy import EntropyOptions, EntropyStats, describe_sites, measure
from ..errors import PruneError
from ..graph import TraceError, first_linear_ops, input_reaches_output, is_fully_sharded, last_linear_ops, trace
from ..masks import (
    MASK_SUFFIX,
    PACKED_SUFFIX,
    full_mask,
    is_mask_key,
    pack_masks_,
    remaining_weights,
    remove_masks,
    restore_masks,
    set_mask,
    shard_packed_mask,
    sparsity,
    stored_mask,
)
from ..sharded import full, is_sharded, local, reshard, shard_like
from .config import IterationRecord, PruneConfig
from .snapshot import Snapshot, compact_state, expand_into

__all__ = ["Pruner", "Step"]


@dataclass
class Step:
    """What one pruning step changed."""

    pruned: dict[str, int]
    linearized: list[str]
    capped: dict[str, int]

    @property
    def empty(self) -> bool:
        return not any(self.pruned.values()) and not self.linearized


class Pruner:
    """State of one run of the loop, and the helpers a :class:`~nepenthe.loop.methods.PruningMethod` steps with."""

    def __init__(self, model: nn.Module, calib: Iterable, config: PruneConfig, measure_kwargs: dict):
        self.model, self.calib, self.config = model, calib, config
        self.measure_kwargs = {**config.entropy_options(), "max_batches": config.max_calib_batches, **measure_kwargs}
        self.replaced: dict[str, tuple[str, nn.Module]] = {}  # EASIER: site -> (module path, original)
        self.method = config.strategy
        if config.pack_masks:  # masks the model already carries are stored packed too
            pack_masks_(model)
        self.graph = self._trace()
        if self.graph is not None:
            self.site_layers: dict[str, str] = self._site_layers()
        else:
            self.site_layers = self._site_layers_by_running() if self.method.needs_graph else {}
        self.layers = self.method.layers(self)
        if not self.layers and self.method.scalable:
            raise PruneError(
                f"{type(model).__name__} has no prunable layer: no Conv/Linear feeds a rectifier"
                + (" that filter_fn and protect leave prunable" if config.filter_fn or config.protect else "") + ".")

    def _trace(self) -> fx.GraphModule | None:
        try:
            return trace(self.model, "finding the layers that feed each rectifier", structure_only=True)
        except TraceError as exc:
            # IMP prunes every Conv/Linear without knowing the graph; the entropy methods find the
            # layer feeding each rectifier by running the model (_site_layers_by_running). Either
            # way only the cut check is lost.
            warnings.warn(f"{exc} {self.method.name.upper()} runs without the cut check: a layer may be emptied even "
                          "when that disconnects the network (use layer_caps to cap it).", stacklevel=3)
            return None

    def _site_layers_by_running(self) -> dict[str, str]:
        """Call site -> the Conv/Linear feeding it, for a model fx cannot trace: one measured batch,
        where each rectifier whose input is a Conv/Linear's output tensor itself names it (a
        rectifier after another op, e.g. a gated MLP's product, has no producer and is not pruned)."""
        stats = measure(self.model, self.calib, **{**self.measure_kwargs, "max_batches": 1})
        if not any(info.producer is not None for info in stats.sites.values()):
            raise PruneError(f"{type(self.model).__name__} cannot be traced, and running it showed no rectifier fed "
                             "directly by a Conv/Linear, so there is no layer to prune by entropy; method='imp' "
                             "prunes without that link.")
        return self._prunable(stats.sites)

    def protected(self, name: str) -> bool:
        """Whether ``protect`` names module ``name``."""
        special = {"first": first_linear_ops, "last": last_linear_ops}
        for pattern in self.config.protect:
            if pattern in special:
                if self.graph is not None and name in special[pattern](self.graph):
                    return True
            elif fnmatch.fnmatchcase(name, pattern):
                return True
        return False

    def _site_layers(self) -> dict[str, str]:
        """Call site -> the Conv/Linear feeding it (the prunable set L of docs/method.md §2)."""
        try:
            infos = describe_sites(self.model)
        except TraceError as exc:
            raise PruneError(f"finding the layer that feeds each rectifier needs tracing: {exc}") from exc
        return self._prunable(infos)  # FSDP2 too: measure counts functional calls in the model's own forward

    def _prunable(self, infos) -> dict[str, str]:
        """Call site -> its producer, for the sites with one that ``protect`` and ``filter_fn`` leave prunable."""
        modules = dict(self.model.named_modules())
        return {name: info.producer for name, info in infos.items()
                if info.producer is not None and not self.protected(info.producer)
                and (self.config.filter_fn is None or self.config.filter_fn(modules[info.producer], info.producer))}

    # ----- caps -------------------------------------------------------------------------------
    def _kept_by_caps(self, name: str, cut: bool) -> int:
        """Weights of layer ``name`` that its caps keep (0: it may be emptied)."""
        numel = self.layers[name].weight.numel()
        keep = 0
        for pattern, cap in self.config.layer_caps.items():
            if fnmatch.fnmatchcase(name, pattern):
                keep = max(keep, math.ceil((1.0 - float(cap)) * numel - 1e-9))
        if cut and self.config.cut_max_sparsity is not None:
            keep = max(keep, 1, math.ceil((1.0 - self.config.cut_max_sparsity) * numel - 1e-9))
        return keep

    def _limits(self, cut: set[str], rate: float | None) -> dict[str, int]:
        limits = {}
        for n, m in self.layers.items():
            remaining = remaining_weights(m)
            limits[n] = max(remaining - self._kept_by_caps(n, n in cut), 0)
            if rate is not None and n in cut:
                limits[n] = min(limits[n], math.floor(rate * remaining))
        return limits

    def allocate(self, allocate: Callable[[dict[str, int]], dict[str, int]],
                  cut_rate: float | None = None, scale: float = 1.0) -> tuple[dict[str, int], dict[str, int]]:
        """Counts from ``allocate(limits)`` times ``scale``, re-run with tighter limits until the
        layers they would empty leave the output connected to the input (a cut layer is capped,
        never emptied).

        With ``cut_rate`` every cut layer (one whose emptying alone would disconnect the network)
        also loses at most that fraction of its remaining weights in the full allocation.
        """
        remaining = {n: remaining_weights(m) for n, m in self.layers.items()}
        check = self.graph is not None and self.config.cut_max_sparsity is not None
        emptied = {n for n, r in remaining.items() if r == 0}
        cut: set[str] = set()
        if check and cut_rate is not None:
            cut = {n for n in self.layers if n not in emptied and not input_reaches_output(self.graph, emptied | {n})}
        while True:
            limits = self._limits(cut, cut_rate if check else None)
            full = allocate(limits)
            counts = full if scale >= 1.0 else {n: math.floor(k * scale) for n, k in full.items()}
            planned = {n for n, k in counts.items() if k > 0 and k >= remaining[n]}
            if not check or not planned or input_reaches_output(self.graph, emptied | planned):
                break
            # cap the planned layers that cut the network on their own (a stem, a classifier); when
            # only several together do (parallel branches), cap one of them and allocate again
            newly = ({n for n in planned if not input_reaches_output(self.graph, emptied | {n})}
                     or {next(n for n in self.layers if n in planned)})
            if newly <= cut:
                break
            cut |= newly
        capped = {n: remaining[n] - counts.get(n, 0) for n in self.layers
                  if limits[n] < remaining[n] and full.get(n, 0) == limits[n] and remaining[n] > 0}
        return counts, capped

    # ----- one round of pruning ---------------------------------------------------------------
    def layer_entropy(self, stats: EntropyStats) -> dict[str, float]:
        """H of each prunable layer: its rectifier's, the largest when it feeds several."""
        out: dict[str, float] = {}
        entropy = stats.layer_entropy
        for site, layer in self.site_layers.items():
            if site in entropy:
                out[layer] = max(out.get(layer, 0.0), entropy[site])
        return out

    def prune_step(self, stats: EntropyStats, scale: float, avoid: Sequence[str] = ()) -> Step:
        reshard(self.model)  # FSDP2: masks are set on the shards (a forward left the root gathered)
        return self.method.step(self, stats, scale, avoid)

    def prune_by_magnitude(self, counts: dict[str, int], capped: dict[str, int] | None = None) -> Step:
        """Mask the ``counts[name]`` smallest remaining weights of each layer; the step's record."""
        for n, k in counts.items():
            if k > 0:
                m = self.layers[n]
                # FSDP2: one layer gathered at a time (never the whole model), the new mask sliced back
                # locally by set_mask: exactly the mask one process computes
                mask = full_mask(m)  # packed: unpacked by magnitude_mask into the one bool copy it returns
                chosen = budget.magnitude_mask(full(m.weight), mask, k)
                set_mask(m, chosen, packed=self.config.pack_masks or None)
                del mask, chosen  # before the next layer's
        return Step({n: counts.get(n, 0) for n in self.layers}, [], dict(capped or {}))

    def replace_with_identity(self, site: str, stats: EntropyStats) -> None:
        """Put ``nn.Identity`` in place of the activation module of call site ``site`` (EASIER)."""
        path = stats.sites[site].module_path if site in stats.sites else None
        if path is None or "#" in site:
            raise PruneError(f"EASIER replaces activation modules; call site {site!r} is a functional call or a "
                             "module used at several places. Give each activation its own nn.Module instance.")
        self.replaced[site] = (path, set_submodule(self.model, path, nn.Identity()))

    def restore_linearized(self, keep: Sequence[str]) -> None:
        """Undo EASIER replacements not in ``keep`` (when rolling back to an earlier iteration)."""
        for site in [s for s in self.replaced if s not in keep]:
            path, original = self.replaced.pop(site)
            set_submodule(self.model, path, original)

    # ----- snapshots --------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """The model's state as :meth:`restore` takes it back (masked parameters as their kept values:
        :mod:`nepenthe.loop.snapshot`)."""
        reshard(self.model)  # FSDP2: the state is the shards
        return compact_state(self.model.state_dict(), sorted(self.replaced))

    def keep(self, state: dict, replaced: Sequence[str]) -> Snapshot:
        """A snapshot of a checkpoint's whole ``state`` (read from a file, used by nothing else: its
        tensors are kept, compacted as :meth:`snapshot` does; FSDP2: this rank's slices, :meth:`as_shards`)."""
        if is_fully_sharded(self.model):
            return self.as_shards(Snapshot(copy.deepcopy(state), list(replaced)))
        return compact_state(state, list(replaced), clone=False)

    def as_shards(self, snap: Snapshot) -> Snapshot:
        """``snap`` as :meth:`snapshot` takes it. FSDP2: a checkpoint's whole tensors (every rank read
        the file) cut to this rank's slices, each sharded as the model's tensor of that key and a mask
        as its parameter (no communication), so that a rank keeps its share only; otherwise ``snap``."""
        if not is_fully_sharded(self.model):
            return snap
        reshard(self.model)
        model_state = self.model.state_dict()

        def like(key: str):  # a mask the model does not hold yet is sharded as the parameter it masks
            return model_state.get(key, model_state.get(key.removesuffix(MASK_SUFFIX)))

        def cut(key: str, value):
            if key.endswith(PACKED_SUFFIX):  # a checkpoint's whole bits, or a snapshot's per-slice form
                return value if is_sharded(value) else shard_packed_mask(value, model_state[key.removesuffix(
                    PACKED_SUFFIX)])
            return value if is_sharded(value) or not is_sharded(like(key)) else shard_like(value, like(key)).clone()

        # clone: the slice must not keep the whole tensor it was cut from alive
        state = {k: cut(k, v) for k, v in snap.state.items()}
        return Snapshot(state, list(snap.replaced), snap.kept)

    def restore(self, snap: Snapshot) -> None:
        """Put the model back as it was at ``snap`` (or at a checkpoint's whole state): activations,
        masks (which only grow, so the later ones are dropped first) and weights."""
        snap = self.as_shards(snap)  # FSDP2 (includes the reshard); the snapshot itself otherwise
        self.restore_linearized(snap.replaced)
        remove_masks(self.model)
        # copies: a mask buffer must not alias the snapshot, which may be restored again later; each in
        # the form the snapshot holds it (bool *_mask or packed *_mask_bits), so load_state_dict finds its keys
        restore_masks(self.model, {k: v.clone() for k, v in snap.state.items() if is_mask_key(k)})
        # compacted parameters written in place (by their restored masks), then the rest loaded
        self.model.load_state_dict(expand_into(snap, self.model.state_dict()) if snap.kept else snap.state)
        if self.config.pack_masks:  # a checkpoint written with bool masks, resumed with packing on
            pack_masks_(self.model)

    def mask_digest(self) -> int:
        """A digest of every prunable layer's mask (compared across ranks after each step)."""
        # as stored (packed ones hashed packed: every rank stores them alike); an FSDP2 mask is a
        # different slice on every rank, computed from gathered layers
        masks = (stored_mask(self.layers[n]) for n in sorted(self.layers) if not is_sharded(self.layers[n].weight))
        return digest(m for m in masks if m is not None and not is_sharded(m))

    def nonfinite_parameters(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(local(p)).all())]

    # ----- bookkeeping ------------------------------------------------------------------------
    def record(self, iteration: int, accuracy: float | None, stats: EntropyStats | None, step: Step,
               within: bool, started: float, zeta: float, backoffs: list[dict],
               failure: str | None = None) -> IterationRecord:
        overall, per_layer = sparsity(self.layers)
        entropy = stats.layer_entropy if stats is not None else {}
        return IterationRecord(
            iteration=iteration, accuracy=accuracy, sparsity=overall, layer_sparsity=per_layer,
            layer_entropy=entropy, zero_entropy_layers=[k for k, v in entropy.items() if v == 0.0],
            pruned=step.pruned, linearized=step.linearized, within_tolerance=within,
            seconds=time.perf_counter() - started, zeta=zeta, backoffs=backoffs, capped=step.capped, failure=failure,
            collapsed=sum(v == 0.0 for v in entropy.values()) + len(self.replaced))

    def measure(self) -> EntropyStats:
        if self.replaced and not describe_sites(self.model):
            # EASIER replaced every activation: nothing is left to measure, and the next step stops the loop
            return EntropyStats({}, {}, EntropyOptions(**self.config.entropy_options()))
        return measure(self.model, self.calib, **self.measure_kwargs)
