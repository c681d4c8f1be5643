"""The statistics type: per-call-site sign histograms and everything derived from them
(:class:`EntropyStats`), the options of docs/method.md §1 (:class:`EntropyOptions`) and the errors of measuring."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .. import ops
from ..activations import Rectifier
from ..errors import MeasureError

__all__ = ["ESTIMATORS", "EntropyOptions", "EntropyStats", "SiteInfo"]

ESTIMATORS = ("pooled", "batch_mean")




@dataclass
class EntropyOptions:
    """How histograms become entropies (docs/method.md §1). Defaults are the project's decisions."""

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
        """bool[C]: neurons never ON (only OFF or exactly zero) on the data; a neuron the data never
        reached (no observation at all) is not: nothing is known about it."""
        return {k: (h[:, ops.ON] == 0) & (h[:, :3].sum(1) > 0) for k, h in self.histogram.items()}

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
        """Call sites whose layer entropy is exactly 0 (linearizable layers, docs/method.md §1); a site
        that saw no observation has no entropy to speak of and is not listed."""
        seen = self.num_samples
        return [k for k, v in self.layer_entropy.items() if v == 0.0 and seen[k] > 0]

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

    def __reduce__(self):
        # pickled as its state_dict (on the CPU), rebuilt by a function torch.load(weights_only=True) allows
        return _rebuild_entropy_stats, (self.state_dict(),)

    def __copy__(self) -> EntropyStats:  # copies keep their device (not the pickling path above)
        return type(self)(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def __deepcopy__(self, memo) -> EntropyStats:
        return type(self)(**{f.name: copy.deepcopy(getattr(self, f.name), memo) for f in dataclasses.fields(self)})

    def __repr__(self) -> str:
        neurons = sum(int(h.shape[0]) for h in self.histogram.values())
        return (f"EntropyStats({len(self.histogram)} rectifier sites, {neurons} neurons, {self.batches} batches, "
                f"zero-entropy sites {len(self.zero_entropy_layers)}, zero_as={self.options.zero_as!r}, "
                f"aggregate={self.options.aggregate!r})")

    def summary(self) -> dict[str, dict]:
        """Per call site: neurons, entropy, always-ON/OFF counts (for reports)."""
        ent, off, on, sat = self.layer_entropy, self.always_off, self.always_on, self.always_saturated
        return {
            k: {"neurons": int(h.shape[0]), "entropy": ent[k], "always_off": int(off[k].sum()),
                "always_on": int(on[k].sum()), "always_saturated": int(sat[k].sum()),
                "producer": self.sites[k].producer}
            for k, h in self.histogram.items()
        }



def _rebuild_entropy_stats(state: dict) -> EntropyStats:
    """Unpickling of :class:`EntropyStats` (``torch.save(stats)`` / ``torch.load``, also with
    ``weights_only=True``: this function is on torch's allow-list, and its argument is plain tensors
    and values)."""
    return EntropyStats.from_state_dict(state)


torch.serialization.add_safe_globals([_rebuild_entropy_stats])
