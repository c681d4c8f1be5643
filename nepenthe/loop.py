"""The iterative NEPENTHE loop (SPEC §3) and its baselines, with checkpoints and resume.

::

    result = nepenthe.prune(model, calib_loader,
                            retrain=lambda m, it: my_train(m),      # masks are yours to keep:
                            evaluate=lambda m: my_val_accuracy(m),  # see nepenthe.masks
                            config=nepenthe.PruneConfig(max_iters=5, delta=1.0))

The loop knows nothing of kernels or data formats: it calls ``measure``, the budget, the mask
helpers and the two user functions. ``retrain`` must keep the masks enforced after every
optimizer step (``nepenthe.masks.keep_masks_after_steps`` or the built-in trainer do it).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import budget
from .checkpoint import atomic_torch_save, atomic_write_json
from .entropy import EntropyOptions, EntropyStats, describe_sites, measure
from .graph import TraceError
from .masks import (
    get_mask,
    prunable_modules,
    remaining_weights,
    remove_masks,
    restore_masks,
    set_mask,
    sparsity,
)

METHODS = ("nepenthe", "imp", "egp", "easier")

# Entropy options each method uses unless the config overrides them (SPEC §3 baselines).
_METHOD_ENTROPY = {
    "nepenthe": dict(zero_as="exclude", aggregate="mean", estimator="pooled"),
    "imp": dict(zero_as="exclude", aggregate="mean", estimator="pooled"),
    "egp": dict(zero_as="off", aggregate="mixed_mean", estimator="batch_mean"),
    "easier": dict(zero_as="on", aggregate="mean", estimator="pooled"),
}


class PruneError(RuntimeError):
    """The loop cannot run as configured (nothing prunable, mismatched checkpoint, ...)."""


@dataclass
class PruneConfig:
    """Options of the iterative loop. ``filter_fn(module, fqn)`` restricts the prunable layers."""

    method: str = "nepenthe"
    zeta: float = 0.5
    max_iters: int = 9
    delta: float | None = 1.0  # stop when accuracy < dense - delta (points); None: never
    temperature: float = 1.0
    zero_as: str | None = None  # None: the method's default
    aggregate: str | None = None
    estimator: str | None = None
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

    def entropy_options(self) -> dict:
        opts = dict(_METHOD_ENTROPY[self.method])
        for key in opts:
            if getattr(self, key) is not None:
                opts[key] = getattr(self, key)
        return opts

    def identity(self) -> dict:
        """The settings a checkpoint must match to be resumed."""
        return {"method": self.method, "zeta": self.zeta, "temperature": self.temperature, **self.entropy_options()}


@dataclass
class IterationRecord:
    """What one iteration did and reached (iteration 0 is the dense model)."""

    iteration: int
    accuracy: float
    sparsity: float
    layer_sparsity: dict[str, float]
    layer_entropy: dict[str, float]
    zero_entropy_layers: list[str]
    pruned: dict[str, int]
    linearized: list[str]
    within_tolerance: bool
    seconds: float

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


class _Pruner:
    """State of one run of the loop."""

    def __init__(self, model: nn.Module, calib: Iterable, config: PruneConfig, measure_kwargs: dict):
        self.model, self.calib, self.config = model, calib, config
        self.measure_kwargs = {**config.entropy_options(), "max_batches": config.max_calib_batches, **measure_kwargs}
        self.replaced: dict[str, tuple[str, nn.Module]] = {}  # EASIER: site -> (module path, original)
        if config.method == "imp":
            self.layers = prunable_modules(model, config.filter_fn)
            self.site_layers: dict[str, str] = {}
        else:
            self.site_layers = self._site_layers()
            modules = dict(model.named_modules())
            self.layers = {p: modules[p] for p in dict.fromkeys(self.site_layers.values())}
        if not self.layers and config.method != "easier":
            raise PruneError(
                f"{type(model).__name__} has no prunable layer: no Conv/Linear feeds a rectifier"
                + (" that filter_fn accepts" if config.filter_fn else "") + ".")

    def _site_layers(self) -> dict[str, str]:
        """Call site -> the Conv/Linear feeding it (the prunable set L of SPEC §2)."""
        try:
            infos = describe_sites(self.model)
        except TraceError as exc:
            raise PruneError(f"finding the layer that feeds each rectifier needs tracing: {exc}") from exc
        modules = dict(self.model.named_modules())
        return {name: info.producer for name, info in infos.items()
                if info.producer is not None
                and (self.config.filter_fn is None or self.config.filter_fn(modules[info.producer], info.producer))}

    # ----- one round of pruning -------------------------------------------------------------
    def layer_entropy(self, stats: EntropyStats) -> dict[str, float]:
        """H of each prunable layer: its rectifier's, the largest when it feeds several."""
        out: dict[str, float] = {}
        entropy = stats.layer_entropy
        for site, layer in self.site_layers.items():
            if site in entropy:
                out[layer] = max(out.get(layer, 0.0), entropy[site])
        return out

    def prune_step(self, stats: EntropyStats) -> tuple[dict[str, int], list[str]]:
        cfg = self.config
        if cfg.method == "easier":
            return {}, self._easier_step(stats)
        weights = {n: m.weight for n, m in self.layers.items()}
        masks = {n: get_mask(m) for n, m in self.layers.items()}
        if cfg.method == "imp":
            new_masks = budget.global_magnitude_masks(weights, masks, cfg.zeta)
            before = {n: remaining_weights(m) for n, m in self.layers.items()}
            for n, mask in new_masks.items():
                set_mask(self.layers[n], mask)
            return {n: before[n] - remaining_weights(m) for n, m in self.layers.items()}, []
        entropy = self.layer_entropy(stats)
        remaining = {n: remaining_weights(m) for n, m in self.layers.items()}
        irrelevance = {n: budget.irrelevance(entropy.get(n, 0.0), weights[n], masks[n]) for n in self.layers}
        counts = budget.weights_to_prune(entropy, remaining, irrelevance, cfg.zeta, cfg.temperature)
        for n, k in counts.items():
            if k > 0:
                set_mask(self.layers[n], budget.magnitude_mask(weights[n], masks[n], k))
        return counts, []

    def _easier_step(self, stats: EntropyStats) -> list[str]:
        """Replace the lowest-entropy remaining activation (and every zero-entropy one) by identity."""
        entropy = {k: v for k, v in stats.layer_entropy.items() if k not in self.replaced}
        if not entropy:
            return []
        lowest = min(entropy, key=lambda k: (entropy[k], k))
        chosen = [lowest] + [k for k, v in entropy.items() if v == 0.0 and k != lowest]
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

    # ----- bookkeeping ------------------------------------------------------------------------
    def record(self, iteration: int, accuracy: float, stats: EntropyStats, pruned: dict[str, int],
               linearized: list[str], tolerance: float | None, started: float) -> IterationRecord:
        overall, per_layer = sparsity(self.layers)
        entropy = stats.layer_entropy
        return IterationRecord(
            iteration=iteration, accuracy=accuracy, sparsity=overall, layer_sparsity=per_layer,
            layer_entropy=entropy, zero_entropy_layers=[k for k, v in entropy.items() if v == 0.0],
            pruned=pruned, linearized=linearized,
            within_tolerance=tolerance is None or accuracy >= tolerance, seconds=time.perf_counter() - started)

    def measure(self) -> EntropyStats:
        if self.config.method == "easier" and self.replaced and not describe_sites(self.model):
            # EASIER replaced every activation: nothing is left to measure, and the next step stops the loop
            return EntropyStats({}, {}, EntropyOptions(**self.config.entropy_options()))
        stats = measure(self.model, self.calib, **self.measure_kwargs)
        return stats


def _checkpoint_path(directory: Path, iteration: int) -> Path:
    return directory / f"iter_{iteration:03d}.pt"


def _save_checkpoint(directory: Path, pruner: _Pruner, record: IterationRecord, stats: EntropyStats,
                     config: PruneConfig) -> None:
    atomic_torch_save({
        "format": "nepenthe.checkpoint/1",
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
    calls ``retrain(model, iteration)`` and ``evaluate(model)`` (accuracy in percent). The loop
    stops when the accuracy falls below dense − ``delta``, nothing is left to prune, or after
    ``max_iters``; the model is left as the last iteration within tolerance. With
    ``checkpoint_dir`` every iteration is saved atomically and a rerun resumes after the last one.
    Extra keyword arguments go to :func:`nepenthe.measure` (e.g. ``input_fn``, ``device``).
    """
    config = config or PruneConfig()
    pruner = _Pruner(model, calib_data, config, measure_kwargs)
    directory = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    records: list[IterationRecord] = []
    best_state: dict | None = None
    best_linearized: list[str] = []
    best_stats: EntropyStats | None = None
    selected, stop_reason = 0, f"reached max_iters={config.max_iters}"

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
        remove_masks(model)  # the model may carry masks of the interrupted iteration that the checkpoint lacks
        restore_masks(model, last["model"])
        model.load_state_dict(last["model"])
        records = [IterationRecord(**c["record"]) for c in checkpoints]
        stats = EntropyStats.from_state_dict(last["stats"])
        within = [r.iteration for r in records if r.within_tolerance]
        selected = within[-1] if within else 0
        keep = checkpoints[selected]
        best_state, best_linearized = copy.deepcopy(keep["model"]), list(keep["linearized"])
        best_stats = EntropyStats.from_state_dict(keep["stats"])
        if not records[-1].within_tolerance:
            return _finish(pruner, records, selected, "accuracy fell below tolerance (resumed)", best_state,
                           best_linearized, best_stats)
    else:
        started = time.perf_counter()
        stats = pruner.measure()
        dense = float(evaluate(model))
        tolerance = None if config.delta is None else dense - config.delta
        records.append(pruner.record(0, dense, stats, {}, [], tolerance, started))
        best_state, best_stats = copy.deepcopy(model.state_dict()), stats
        if directory:
            _save_checkpoint(directory, pruner, records[0], stats, config)
        for cb in callbacks:
            cb(records[0], model)
    dense = records[0].accuracy
    tolerance = None if config.delta is None else dense - config.delta

    for iteration in range(len(records), config.max_iters + 1):
        started = time.perf_counter()
        pruned, linearized = pruner.prune_step(stats)
        if not any(pruned.values()) and not linearized:
            stop_reason = "nothing left to prune (every prunable layer has zero entropy or no weights)"
            break
        retrain(model, iteration)
        accuracy = float(evaluate(model))
        stats = pruner.measure()
        record = pruner.record(iteration, accuracy, stats, pruned, linearized, tolerance, started)
        records.append(record)
        if directory:
            _save_checkpoint(directory, pruner, record, stats, config)
        for cb in callbacks:
            cb(record, model)
        if not record.within_tolerance:
            stop_reason = f"accuracy {accuracy:.2f} fell below dense {dense:.2f} - delta {config.delta}"
            break
        selected = iteration
        best_state, best_linearized, best_stats = copy.deepcopy(model.state_dict()), sorted(pruner.replaced), stats
    return _finish(pruner, records, selected, stop_reason, best_state, best_linearized, best_stats)


def _finish(pruner: _Pruner, records, selected, stop_reason, best_state, best_linearized, best_stats) -> PruneResult:
    """Leave the model as the selected iteration and package the result."""
    pruner.restore_linearized(best_linearized)
    remove_masks(pruner.model)  # masks only grow: drop the later ones before loading the earlier state
    restore_masks(pruner.model, best_state)
    pruner.model.load_state_dict(best_state)
    if pruner.config.checkpoint_dir:
        atomic_write_json({"selected": selected, "stop_reason": stop_reason,
                           "iterations": [r.to_dict() for r in records]},
                          Path(pruner.config.checkpoint_dir) / "summary.json")
    return PruneResult(records, selected, stop_reason, best_stats)
