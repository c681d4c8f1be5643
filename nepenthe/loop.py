"""The iterative NEPENTHE loop (SPEC §3) and its baselines, with back-off, checkpoints and resume.

::

    result = nepenthe.prune(model, calib_loader,
                            retrain=lambda m, it: my_train(m),      # masks are yours to keep:
                            evaluate=lambda m: my_val_accuracy(m),  # see nepenthe.masks
                            config=nepenthe.PruneConfig(max_iters=5, delta=1.0))

The loop knows nothing of kernels or data formats: it calls ``measure``, the budget, the mask
helpers and the two user functions. ``retrain`` must keep the masks enforced after every
optimizer step (``nepenthe.masks.keep_masks_after_steps`` or the built-in trainer do it).

A step cannot destroy the model:

* **back-off** — when an iteration's validation accuracy falls below dense − δ, or retraining
  diverges (``retrain`` raises ``FloatingPointError``, as the built-in trainer does on a NaN/Inf
  loss, or leaves non-finite weights), the iteration's start is restored and the step retried
  with its pruning amount multiplied by ``backoff_factor`` — for the entropy budget, every
  layer's share of the full-ζ allocation, so a layer the full step would empty is only thinned;
  for IMP the global fraction; EASIER, which removes one activation per step, tries the
  next-lowest-entropy one instead — at most ``max_backoffs`` times. The next
  iteration keeps the smaller step; an iteration that passes at once lets it grow one notch
  back towards ζ. Every failed attempt is in the record.
* **no cut** — a layer whose emptying would disconnect the output from the input (a stem, any
  conv of a plain chain: every later neuron would be constant) is capped at ``cut_max_sparsity``,
  and the entropy budget (NEPENTHE, EGP) prunes it no faster than the step's rate ζ: the sharp
  softmax would otherwise give a small, least relevant cut layer its whole share in one step.
  A residual branch is not capped: emptied, it becomes a constant that folding removes exactly.
* **per-layer caps and protected layers** — ``layer_caps`` (glob → max sparsity), ``protect``
  (globs, plus ``"first"`` / ``"last"`` for the linear ops next to the input / output) and
  ``filter_fn(module, fqn)``.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from . import budget
from .checkpoint import atomic_torch_save, atomic_write_json
from .entropy import EntropyOptions, EntropyStats, describe_sites, measure
from .errors import PruneError
from .graph import TraceError, first_linear_ops, input_reaches_output, last_linear_ops, trace
from .masks import (
    MASK_SUFFIX,
    get_mask,
    prunable_modules,
    remaining_weights,
    remove_masks,
    restore_masks,
    set_mask,
    sparsity,
)

METHODS = ("nepenthe", "imp", "egp", "easier")
SELECT_RULES = ("depth", "last")

# Entropy options each method uses unless the config overrides them (SPEC §3 baselines). EGP and
# EASIER follow their released code: per-batch entropies averaged over batches, z = 0 counted as
# OFF (EGP) or ON (EASIER), and ReLU6 as a two-state ON/OFF unit.
_METHOD_ENTROPY = {
    "nepenthe": dict(zero_as="exclude", aggregate="mean", estimator="pooled", saturation=True),
    "imp": dict(zero_as="exclude", aggregate="mean", estimator="pooled", saturation=True),
    "egp": dict(zero_as="off", aggregate="mixed_mean", estimator="batch_mean", saturation=False),
    "easier": dict(zero_as="on", aggregate="mean", estimator="batch_mean", saturation=False),
}



@dataclass
class PruneConfig:
    """Options of the iterative loop (see the module docstring for the safety rules).

    ``normalize="fan_in"`` scales the budget's magnitude term by √fan-in (see
    :func:`nepenthe.budget.irrelevance`). ``select`` says which iteration within tolerance is
    returned (see :func:`select_iteration`). ``protect`` and ``layer_caps`` name modules by glob
    patterns over their qualified names; ``protect`` also takes ``"first"`` and ``"last"``.
    """

    method: str = "nepenthe"
    zeta: float = 0.5
    max_iters: int = 9
    delta: float | None = 1.0  # back off / stop when accuracy < dense - delta (points); None: never
    temperature: float = 1.0
    zero_as: str | None = None  # None: the method's default
    aggregate: str | None = None
    estimator: str | None = None
    saturation: bool | None = None  # ReLU6 three-state (True) or two-state (False) entropy
    normalize: str = "fan_in"  # Fashion-MNIST: 8 vs 4 layers on the MLP, 0 vs 0.7 on ResNet-18 (bench/RESULTS.md)
    protect: tuple[str, ...] = ()
    layer_caps: dict[str, float] = field(default_factory=dict)
    cut_max_sparsity: float | None = 0.99
    max_backoffs: int = 3
    backoff_factor: float = 0.5
    select: str = "depth"
    checkpoint_dir: str | None = None
    resume: bool = True
    max_calib_batches: int | None = None
    filter_fn: Callable[[nn.Module, str], bool] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0.0 < self.zeta <= 1.0:
            raise ValueError(f"zeta must be in (0, 1], got {self.zeta}")
        if self.max_iters < 0:
            raise ValueError(f"max_iters must be >= 0, got {self.max_iters}")
        if self.normalize not in budget.NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {budget.NORMALIZATIONS}, got {self.normalize!r}")
        if self.max_backoffs < 0:
            raise ValueError(f"max_backoffs must be >= 0, got {self.max_backoffs}")
        if not 0.0 < self.backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {self.backoff_factor}")
        if self.select not in SELECT_RULES:
            raise ValueError(f"select must be one of {SELECT_RULES}, got {self.select!r}")
        if self.cut_max_sparsity is not None and not 0.0 <= self.cut_max_sparsity < 1.0:
            raise ValueError(f"cut_max_sparsity must be in [0, 1) or None, got {self.cut_max_sparsity}")
        if isinstance(self.protect, str):
            self.protect = (self.protect,)
        self.protect = tuple(self.protect)
        for pattern, cap in self.layer_caps.items():
            if not 0.0 <= float(cap) <= 1.0:
                raise ValueError(f"layer_caps[{pattern!r}] must be a sparsity in [0, 1], got {cap}")

    def entropy_options(self) -> dict:
        opts = dict(_METHOD_ENTROPY[self.method])
        for key in opts:
            if getattr(self, key) is not None:
                opts[key] = getattr(self, key)
        return opts

    def identity(self) -> dict:
        """The settings a checkpoint must match to be resumed."""
        return {"method": self.method, "zeta": self.zeta, "temperature": self.temperature, **self.entropy_options(),
                "normalize": self.normalize, "protect": list(self.protect), "layer_caps": dict(self.layer_caps),
                "cut_max_sparsity": self.cut_max_sparsity, "max_backoffs": self.max_backoffs,
                "backoff_factor": self.backoff_factor}


@dataclass
class IterationRecord:
    """What one iteration did and reached (iteration 0 is the dense model).

    ``zeta`` is the pruning fraction the kept step used (ζ times the back-off scale); ``backoffs``
    lists the failed attempts before it (their ζ, accuracy and why they failed); ``capped`` maps
    each layer whose share was limited by a cap to the weights the cap kept.
    """

    iteration: int
    accuracy: float | None  # None when the step diverged and nothing could be evaluated
    sparsity: float
    layer_sparsity: dict[str, float]
    layer_entropy: dict[str, float]
    zero_entropy_layers: list[str]
    pruned: dict[str, int]
    linearized: list[str]
    within_tolerance: bool
    seconds: float
    zeta: float = 0.0
    backoffs: list[dict] = field(default_factory=list)
    capped: dict[str, int] = field(default_factory=dict)
    failure: str | None = None  # why this iteration's last attempt failed (then within_tolerance is False)
    collapsed: int = 0  # rectifier layers linear on the data (zero entropy) or replaced by the identity (EASIER)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PruneResult:
    iterations: list[IterationRecord]
    selected: int  # the iteration whose model the loop returned
    stop_reason: str
    stats: EntropyStats  # statistics of the selected model on the calibration data

    @property
    def dense_accuracy(self) -> float:
        return self.iterations[0].accuracy

    @property
    def selected_record(self) -> IterationRecord:
        return self.iterations[self.selected]

    @property
    def backoffs(self) -> int:
        """Failed attempts over the whole run (each cost one retraining)."""
        return sum(len(r.backoffs) for r in self.iterations)


@dataclass
class _Step:
    """What one pruning step changed."""

    pruned: dict[str, int]
    linearized: list[str]
    capped: dict[str, int]

    @property
    def empty(self) -> bool:
        return not any(self.pruned.values()) and not self.linearized


@dataclass
class _Snapshot:
    state: dict
    replaced: list[str]


class _Pruner:
    """State of one run of the loop."""

    def __init__(self, model: nn.Module, calib: Iterable, config: PruneConfig, measure_kwargs: dict):
        self.model, self.calib, self.config = model, calib, config
        self.measure_kwargs = {**config.entropy_options(), "max_batches": config.max_calib_batches, **measure_kwargs}
        self.replaced: dict[str, tuple[str, nn.Module]] = {}  # EASIER: site -> (module path, original)
        self.graph = self._trace()
        if config.method == "imp":
            self.layers = {n: m for n, m in prunable_modules(model, config.filter_fn).items() if not self._protected(n)}
            self.site_layers: dict[str, str] = {}
        else:
            self.site_layers = self._site_layers()
            modules = dict(model.named_modules())
            self.layers = {p: modules[p] for p in dict.fromkeys(self.site_layers.values())}
        if not self.layers and config.method != "easier":
            raise PruneError(
                f"{type(model).__name__} has no prunable layer: no Conv/Linear feeds a rectifier"
                + (" that filter_fn and protect leave prunable" if config.filter_fn or config.protect else "") + ".")

    def _trace(self) -> fx.GraphModule | None:
        try:
            return trace(self.model, "finding the layers that feed each rectifier")
        except TraceError as exc:
            if self.config.method != "imp":
                raise PruneError(f"finding the layer that feeds each rectifier needs tracing: {exc}") from exc
            # IMP prunes every Conv/Linear without knowing the graph; only the cut check is lost
            warnings.warn(f"{exc} IMP runs without the cut check: a layer may be emptied even when that "
                          "disconnects the network (use layer_caps to cap it).", stacklevel=3)
            return None

    def _protected(self, name: str) -> bool:
        special = {"first": first_linear_ops, "last": last_linear_ops}
        for pattern in self.config.protect:
            if pattern in special:
                if self.graph is not None and name in special[pattern](self.graph):
                    return True
            elif fnmatch.fnmatchcase(name, pattern):
                return True
        return False

    def _site_layers(self) -> dict[str, str]:
        """Call site -> the Conv/Linear feeding it (the prunable set L of SPEC §2)."""
        try:
            infos = describe_sites(self.model)
        except TraceError as exc:
            raise PruneError(f"finding the layer that feeds each rectifier needs tracing: {exc}") from exc
        modules = dict(self.model.named_modules())
        return {name: info.producer for name, info in infos.items()
                if info.producer is not None and not self._protected(info.producer)
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

    def _allocate(self, allocate: Callable[[dict[str, int]], dict[str, int]],
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

    def prune_step(self, stats: EntropyStats, scale: float, avoid: Sequence[str] = ()) -> _Step:
        cfg = self.config
        if cfg.method == "easier":
            return _Step({}, self._easier_step(stats, avoid), {})
        weights = {n: m.weight for n, m in self.layers.items()}
        masks = {n: get_mask(m) for n, m in self.layers.items()}
        if cfg.method == "imp":
            zeta = cfg.zeta * scale
            counts, capped = self._allocate(lambda limits: budget.global_magnitude_counts(weights, masks, zeta, limits))
        else:
            entropy = self.layer_entropy(stats)
            remaining = {n: remaining_weights(m) for n, m in self.layers.items()}
            irrelevance = {n: budget.irrelevance(entropy.get(n, 0.0), weights[n], masks[n], cfg.normalize)
                           for n in self.layers}
            # The allocation at the full ζ, every layer's share times the back-off scale: a smaller
            # budget alone would still empty the least relevant layers first (the softmax gives
            # them nearly all of it), so a backed-off step shrinks each layer's cut instead. A cut
            # layer (a stem, any layer of a plain chain) is pruned no faster than the rate ζ.
            counts, capped = self._allocate(lambda limits: budget.weights_to_prune(
                entropy, remaining, irrelevance, cfg.zeta, cfg.temperature, limits), cut_rate=cfg.zeta, scale=scale)
        for n, k in counts.items():
            if k > 0:
                set_mask(self.layers[n], budget.magnitude_mask(weights[n], masks[n], k))
        return _Step({n: counts.get(n, 0) for n in self.layers}, [], capped)

    def _easier_step(self, stats: EntropyStats, avoid: Sequence[str]) -> list[str]:
        """Replace the lowest-entropy remaining activation not in ``avoid`` (and every zero-entropy
        one: they are linear on the data already) by identity."""
        entropy = {k: v for k, v in stats.layer_entropy.items() if k not in self.replaced}
        candidates = {k: v for k, v in entropy.items() if k not in avoid}
        if not candidates:
            return []
        lowest = min(candidates, key=lambda k: (candidates[k], k))
        chosen = [lowest] + [k for k, v in entropy.items() if v == 0.0 and k != lowest and k not in avoid]
        for site in chosen:
            self._replace_with_identity(site, stats)
        return chosen

    def _replace_with_identity(self, site: str, stats: EntropyStats) -> None:
        path = stats.sites[site].module_path if site in stats.sites else None
        if path is None or "#" in site:
            raise PruneError(f"EASIER replaces activation modules; call site {site!r} is a functional call or a "
                             "module used at several places. Give each activation its own nn.Module instance.")
        parent_name, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        self.replaced[site] = (path, getattr(parent, child))
        setattr(parent, child, nn.Identity())

    def restore_linearized(self, keep: Sequence[str]) -> None:
        """Undo EASIER replacements not in ``keep`` (when rolling back to an earlier iteration)."""
        for site in [s for s in self.replaced if s not in keep]:
            path, original = self.replaced.pop(site)
            parent_name, _, child = path.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, original)

    # ----- snapshots --------------------------------------------------------------------------
    def snapshot(self) -> _Snapshot:
        return _Snapshot(copy.deepcopy(self.model.state_dict()), sorted(self.replaced))

    def restore(self, snap: _Snapshot) -> None:
        """Put the model back as it was at ``snap``: activations, masks (which only grow, so the
        later ones are dropped first) and weights."""
        self.restore_linearized(snap.replaced)
        remove_masks(self.model)
        # copies: a mask buffer must not alias the snapshot, which may be restored again later
        restore_masks(self.model, {k: v.clone() for k, v in snap.state.items() if k.endswith(MASK_SUFFIX)})
        self.model.load_state_dict(snap.state)

    def nonfinite_parameters(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]

    # ----- bookkeeping ------------------------------------------------------------------------
    def record(self, iteration: int, accuracy: float | None, stats: EntropyStats | None, step: _Step,
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
        if self.config.method == "easier" and self.replaced and not describe_sites(self.model):
            # EASIER replaced every activation: nothing is left to measure, and the next step stops the loop
            return EntropyStats({}, {}, EntropyOptions(**self.config.entropy_options()))
        return measure(self.model, self.calib, **self.measure_kwargs)


def _checkpoint_path(directory: Path, iteration: int) -> Path:
    return directory / f"iter_{iteration:03d}.pt"


def _save_checkpoint(directory: Path, pruner: _Pruner, record: IterationRecord, stats: EntropyStats,
                     config: PruneConfig) -> None:
    atomic_torch_save({
        "format": "nepenthe.checkpoint/2",
        "identity": config.identity(),
        "record": record.to_dict(),
        "linearized": sorted(pruner.replaced),
        "model": pruner.model.state_dict(),
        "stats": stats.state_dict(),
    }, _checkpoint_path(directory, record.iteration))


def _load_checkpoints(directory: Path, config: PruneConfig) -> list[dict]:
    found = sorted(directory.glob("iter_*.pt"))
    checkpoints = []
    for i, path in enumerate(found):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a file we did not write, or one damaged outside nepenthe
            raise PruneError(f"cannot read checkpoint {path}: {exc}. "
                             "Move it away or start in an empty folder.") from exc
        if ckpt.get("identity") != config.identity():
            raise PruneError(f"checkpoint {path} was written with {ckpt.get('identity')}, but this run uses "
                             f"{config.identity()}; use another checkpoint_dir or resume=False.")
        if ckpt["record"]["iteration"] != i:
            raise PruneError(f"checkpoints in {directory} are not consecutive (missing iteration {i}); "
                             "use another checkpoint_dir or resume=False")
        checkpoints.append(ckpt)
    return checkpoints


def select_iteration(records: Sequence[IterationRecord], rule: str = "depth") -> int:
    """The iteration the loop returns, among those within tolerance (iteration 0 always is).

    ``"depth"``: the most collapsed rectifier layers (zero entropy, or replaced by EASIER), then
    the best validation accuracy, then the earliest: a depth reducer gains nothing from sparsity
    that removes no further layer. When no layer collapsed at all it is ``"last"``: the last
    iteration within tolerance (the most sparse), as classic iterative pruning reports.
    """
    within = [r for r in records if r.within_tolerance]
    if rule == "last" or max(r.collapsed for r in within) == 0:
        return within[-1].iteration
    return max(within, key=lambda r: (r.collapsed, r.accuracy if r.accuracy is not None else -math.inf,
                                      -r.iteration)).iteration


def _next_scale(record: IterationRecord, config: PruneConfig) -> float:
    """The step size after ``record``: a step that had to back off is kept for the next iteration;
    one that passed at once grows one notch (back up to ζ), so a single hard iteration does not
    shrink the rest of the run."""
    if record.zeta <= 0:  # the dense record, or EASIER (one activation per step, nothing to scale)
        return 1.0
    scale = record.zeta / config.zeta
    return scale if record.backoffs else min(1.0, scale / config.backoff_factor)


def _failure(accuracy: float, tolerance: float | None, dense: float, delta: float | None) -> str | None:
    if not math.isfinite(accuracy):
        return f"evaluate returned {accuracy}"
    if tolerance is not None and accuracy < tolerance:
        return f"accuracy {accuracy:.2f} fell below dense {dense:.2f} - delta {delta}"
    return None


def prune(
    model: nn.Module,
    calib_data: Iterable,
    *,
    retrain: Callable[[nn.Module, int], object],
    evaluate: Callable[[nn.Module], float],
    config: PruneConfig | None = None,
    callbacks: Sequence[Callable[[IterationRecord, nn.Module], object]] = (),
    **measure_kwargs,
) -> PruneResult:
    """Run the iterative loop of SPEC §3 on ``model`` in place and return what happened.

    Each iteration measures the rectifiers on ``calib_data``, prunes by the method's rule,
    calls ``retrain(model, iteration)`` and ``evaluate(model)`` (accuracy in percent). A step
    that ends below dense − ``delta`` or diverges is retried with a smaller amount (see the
    module docstring); the loop stops when that fails ``max_backoffs`` times, nothing is left to
    prune, or after ``max_iters``. The model is left as the iteration ``config.select`` picks among
    those within tolerance (by default the one with the most collapsed layers). With
    ``checkpoint_dir`` every iteration is saved atomically and a rerun resumes after the last one.
    Extra keyword arguments go to :func:`nepenthe.measure` (e.g. ``input_fn``, ``device``).
    """
    config = config or PruneConfig()
    pruner = _Pruner(model, calib_data, config, measure_kwargs)
    directory = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    records: list[IterationRecord] = []
    stop_reason = f"reached max_iters={config.max_iters}"

    if directory and not config.resume and directory.exists():
        # starting over: files of an earlier run must not be mixed into a later resume of this one
        for stale in [*directory.glob("iter_*.pt"), directory / "summary.json"]:
            stale.unlink(missing_ok=True)
    checkpoints = _load_checkpoints(directory, config) if directory and config.resume and directory.exists() else []
    if checkpoints:
        last = checkpoints[-1]
        stats = pruner.measure()  # learn call-site module paths before replaying replacements
        for site in last["linearized"]:
            pruner._replace_with_identity(site, stats)
        current = _Snapshot(last["model"], list(last["linearized"]))
        pruner.restore(current)
        records = [IterationRecord(**c["record"]) for c in checkpoints]
        stats = EntropyStats.from_state_dict(last["stats"])
        selected = select_iteration(records, config.select)
        keep = checkpoints[selected]
        best = _Snapshot(copy.deepcopy(keep["model"]), list(keep["linearized"]))
        best_stats = EntropyStats.from_state_dict(keep["stats"])
        if records[-1].within_tolerance:  # the next iteration starts from the last good one
            current = _Snapshot(copy.deepcopy(last["model"]), list(last["linearized"]))
        else:
            reason = records[-1].failure or "accuracy fell below tolerance"
            return _finish(pruner, records, selected, f"{reason} (resumed)", best, best_stats)
    else:
        started = time.perf_counter()
        stats = pruner.measure()
        dense = float(evaluate(model))
        records.append(pruner.record(0, dense, stats, _Step({}, [], {}), True, started, 0.0, []))
        selected, current, best_stats = 0, pruner.snapshot(), stats
        best = current
        if directory:
            _save_checkpoint(directory, pruner, records[0], stats, config)
        for cb in callbacks:
            cb(records[0], model)
    dense = records[0].accuracy
    tolerance = None if config.delta is None else dense - config.delta
    scale = _next_scale(records[-1], config)

    for iteration in range(len(records), config.max_iters + 1):
        started = time.perf_counter()
        start = current  # the model as it is now: the last iteration within tolerance
        attempts: list[dict] = []
        avoid: list[str] = []
        while True:
            attempt_started = time.perf_counter()
            step = pruner.prune_step(stats, scale, avoid)
            if step.empty:
                break
            failure, accuracy = None, None
            try:
                retrain(model, iteration)
            except FloatingPointError as exc:  # the built-in trainer's NaN/Inf loss, or the user's
                failure = f"retraining diverged: {exc}"
            if failure is None and (bad := pruner.nonfinite_parameters()):
                failure = f"retraining left NaN/Inf in {', '.join(bad[:3])}"
            if failure is None:
                accuracy = float(evaluate(model))
                failure = _failure(accuracy, tolerance, dense, config.delta)
            if failure is None or len(attempts) >= config.max_backoffs:
                break
            attempts.append({"zeta": config.zeta * scale if config.method != "easier" else None,
                             "pruned": step.pruned, "linearized": step.linearized, "accuracy": accuracy,
                             "failure": failure,
                             "seconds": time.perf_counter() - attempt_started})
            pruner.restore(start)
            scale *= config.backoff_factor
            avoid += step.linearized[:1]  # EASIER: the next-lowest-entropy activation is tried instead
        if step.empty:
            stop_reason = ("nothing left to prune (every prunable layer has zero entropy, no weights, or is capped)"
                           if not attempts else
                           f"{attempts[-1]['failure']}; no smaller step left after {len(attempts)} back-off(s)")
            break
        zeta = config.zeta * scale if config.method != "easier" else 0.0
        stats_now = None if failure is not None and failure.startswith("retraining") else pruner.measure()
        record = pruner.record(iteration, accuracy, stats_now, step, failure is None, started, zeta, attempts, failure)
        records.append(record)
        if directory:
            _save_checkpoint(directory, pruner, record, stats_now if stats_now is not None else stats, config)
        for cb in callbacks:
            cb(record, model)
        if failure is not None:
            stop_reason = failure + (f" (after {len(attempts)} back-off(s))" if attempts else "")
            break
        stats = stats_now
        current = pruner.snapshot()
        if select_iteration(records, config.select) == iteration:
            selected, best, best_stats = iteration, current, stats
        scale = _next_scale(record, config)
    return _finish(pruner, records, selected, stop_reason, best, best_stats)


def _finish(pruner: _Pruner, records, selected, stop_reason, best: _Snapshot, best_stats) -> PruneResult:
    """Leave the model as the selected iteration and package the result."""
    pruner.restore(best)
    if pruner.config.checkpoint_dir:
        atomic_write_json({"selected": selected, "stop_reason": stop_reason,
                           "iterations": [r.to_dict() for r in records]},
                          Path(pruner.config.checkpoint_dir) / "summary.json")
    return PruneResult(records, selected, stop_reason, best_stats)
