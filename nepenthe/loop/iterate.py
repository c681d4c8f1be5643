"""``prune``: the iterative loop (docs/method.md §3) with back-off, checkpoints and resume, and the rule that
selects the iteration it returns."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from .. import distributed as ranks
from ..checkpoint import atomic_write_json, generators_of, remove_stale_temporaries
from ..entropy import EntropyStats
from ..mask_interop import refuse_foreign_pruning, unwrap_model
from ..sharded import is_sharded
from .config import IterationRecord, PruneConfig, PruneResult
from .masked_training import masks_enforced, repair_masked_weights
from .pruner import Pruner, Step
from .resume import (
    failure_stop_reason,
    load_checkpoints,
    model_state,
    restore_random_states,
    save_checkpoint,
    stop_reason_of,
)
from .snapshot import Snapshot

__all__ = ["prune", "prune_", "prune_step", "select_iteration"]


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
    return max(within, key=_depth_order).iteration


def _depth_order(r: IterationRecord) -> tuple:
    return r.collapsed, r.accuracy if r.accuracy is not None else -math.inf, -r.iteration


def _read_back(ckpt: dict) -> dict:
    """The model state of a checkpoint the resume read (one state held at a time), every rank alike."""
    with ranks.agreed(f"reading back the model state of {ckpt['path']}"):
        state = model_state(ckpt)
    return state


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


def _metric_scale(dense: float, config: PruneConfig) -> float:
    """The factor that turns ``evaluate``'s values into percent: ``config.metric_scale`` when given,
    else 100 when the dense model scores within [0, 1] (a fraction: the torchmetrics / Lightning /
    Hugging Face habit; said in a warning), else 1."""
    if config.metric_scale is not None:
        return float(config.metric_scale)
    if 0.0 <= dense <= 1.0:
        warnings.warn(f"evaluate returned {dense:g} for the dense model: read as a fraction, so accuracies are "
                      f"reported (and delta={config.delta} applied) in percent ({100 * dense:.4g}). Pass "
                      "PruneConfig(metric_scale=1) if it is already a percentage.", UserWarning, stacklevel=3)
        return 100.0
    return 1.0


def _evaluate(evaluate: Callable, model: nn.Module, what: str) -> float:
    """``evaluate(model)`` as the one number every rank decides with: the mean over ranks (exact
    when ``evaluate`` already returns the global value, e.g. torchmetrics with sync, or when the
    ranks' validation shards are of equal size); a failure on any rank stops every rank."""
    with ranks.agreed(what):
        value = float(evaluate(model))
    return ranks.mean_over_ranks(value)


def _agreed_failure(failure: str | None) -> str | None:
    """The failure of this attempt as every rank sees it: the first rank's that had one (a rank
    whose retraining diverged makes every rank back off)."""
    if not ranks.is_active():
        return failure
    failures: list = [None] * ranks.world_size()
    torch.distributed.all_gather_object(failures, failure)
    first = next(((r, f) for r, f in enumerate(failures) if f is not None), None)
    return None if first is None else first[1] if first[0] == 0 else f"rank {first[0]}: {first[1]}"


_SAME_WEIGHTS_HINT = ("retrain must leave the same weights on every rank: wrap the model in "
                      "torch.nn.parallel.DistributedDataParallel for training (as nepenthe.train does under torchrun), "
                      "or train every rank on the same data with the same seed")


def _retrain_with_masks(model: nn.Module, retrain: Callable, iteration: int) -> None:
    """``retrain`` with every optimizer step re-applying the masks (:func:`masks_enforced`), then the
    masked weights checked: any revived by an update the hooks cannot see are zeroed, with a warning,
    so the sparsity reported is the model's. FloatingPointError (a diverged loss) goes to the
    caller; any other error on any rank stops every rank (:func:`nepenthe.distributed.agreed`)."""
    diverged = None
    with ranks.agreed(f"retrain (iteration {iteration})"), masks_enforced(model):
        try:
            retrain(model, iteration)
        except FloatingPointError as exc:  # a failed attempt, decided together by the caller
            diverged = exc
    if diverged is not None:
        raise diverged
    revived = repair_masked_weights(model)
    if revived:
        listed = ", ".join(f"{name} ({count})" for name, count in list(revived.items())[:4])
        warnings.warn(f"iteration {iteration}: retrain left {sum(revived.values())} masked weights non-zero in "
                      f"{len(revived)} parameter(s): {listed}; they were set back to zero. Update weights through "
                      "a torch.optim optimizer (or nepenthe.MaskedSGD / MaskedAdamW) to keep the masks.",
                      RuntimeWarning, stacklevel=3)


def prune_(
    model: nn.Module,
    calib_data: Iterable,
    *,
    retrain: Callable[[nn.Module, int], object],
    evaluate: Callable[[nn.Module], float],
    config: PruneConfig | None = None,
    callbacks: Sequence[Callable[[IterationRecord, nn.Module], object]] = (),
    rng_generators: Iterable = (),
    **measure_kwargs,
) -> PruneResult:
    """Run the iterative loop of docs/method.md §3 on ``model`` **in place** and return what happened.

    Each iteration measures the rectifiers on ``calib_data``, prunes by the method's rule,
    calls ``retrain(model, iteration)`` and ``evaluate(model)`` (accuracy in percent, or a fraction:
    see ``PruneConfig.metric_scale``). Whatever optimizer ``retrain`` uses, its steps re-apply the
    masks, and masked weights revived any other way are zeroed with a warning. A step
    that ends below dense − ``delta`` or diverges is retried with a smaller amount (see the
    module docstring); the loop stops when that fails ``max_backoffs`` times, nothing is left to
    prune, or after ``max_iters``. The model is left as the iteration ``config.select`` picks among
    those within tolerance (by default the one with the most collapsed layers). With
    ``checkpoint_dir`` every iteration is saved atomically and a rerun resumes after the last one.
    Extra keyword arguments go to :func:`nepenthe.measure` (e.g. ``input_fn``, ``device``).

    A resumed run ends with the same masks, weights and records (timings aside) as an uninterrupted
    one: each checkpoint keeps the random states of torch (CPU and CUDA), numpy and Python's
    ``random`` as they were when it was written, and a rerun sets them back before the next phase.
    A data loader that shuffles with its own ``torch.Generator`` (``DataLoader(generator=...)``, as
    :func:`nepenthe.data.make_loader` builds) draws from neither: pass it in ``rng_generators``
    (loaders, samplers or generators; the same ones, in the same order, on every run) and its
    state is kept too. What runs before ``prune`` (model creation, dense training) must be seeded
    for a run killed before its first checkpoint to restart the same; callbacks run after the
    checkpoint is written, so one that draws random numbers makes a resumed run differ.
    """
    config = config or PruneConfig()
    model = unwrap_model(model)  # torch.compile / DDP / DataParallel: prune the module they run (in place)
    refuse_foreign_pruning(model, "prune")
    generators = generators_of(rng_generators)  # TypeError for anything else, before any work
    pruner = Pruner(model, calib_data, config, measure_kwargs)
    directory = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    records: list[IterationRecord] = []
    stop_reason = f"reached max_iters={config.max_iters}"

    with ranks.agreed(f"preparing the checkpoint folder {directory}"):
        if directory and directory.exists() and ranks.is_main():
            remove_stale_temporaries(directory)  # killed writes leave .iter_*.pt.*.tmp behind
            if not config.resume:
                # starting over: files of an earlier run must not be mixed into a later resume of this one
                for stale in [*directory.glob("iter_*.pt"), directory / "summary.json"]:
                    stale.unlink(missing_ok=True)
    with ranks.agreed(f"reading the checkpoints in {directory}"):  # every rank resumes from the same files
        checkpoints = load_checkpoints(directory, config) if directory and config.resume and directory.exists() else []
    if checkpoints:
        last = checkpoints[-1]
        stats = pruner.measure()  # learn call-site module paths before replaying replacements
        for site in last["linearized"]:
            pruner.replace_with_identity(site, stats)
        pruner.restore(Snapshot(_read_back(last), list(last["linearized"])))
        records = [IterationRecord(**c["record"]) for c in checkpoints]
        scale = float(config.metric_scale if config.metric_scale is not None
                      else checkpoints[0].get("metric_scale", 1.0))
        stats = EntropyStats.from_state_dict(last["stats"])
        selected = select_iteration(records, config.select)
        keep = checkpoints[selected]
        # the model is the last checkpoint's now: when it is the next start, the snapshot is taken from
        # the model (compacted), and the selected one is the same snapshot when it is the last
        current = pruner.snapshot() if records[-1].within_tolerance else None
        # FSDP2: the snapshots keep this rank's slices only, as the ones the loop takes do
        best = (current if current is not None and keep is last
                else pruner.keep(_read_back(keep), keep["linearized"]))
        best_stats = EntropyStats.from_state_dict(keep["stats"])
        with ranks.agreed(f"restoring the random states of {last['path']}"):
            # last: nothing between here and the next phase draws, as nothing did after the write
            restore_random_states(last, generators)
        if current is None:
            return _finish(pruner, records, selected, stop_reason_of(last, records[-1]), best, best_stats)
        del checkpoints, keep, last  # every iteration's state read back: only the snapshots stay
    else:
        started = time.perf_counter()
        stats = pruner.measure()
        dense = _evaluate(evaluate, model, "evaluate (the dense model)")
        scale = _metric_scale(dense, config)
        records.append(pruner.record(0, dense * scale, stats, Step({}, [], {}), True, started, 0.0, []))
        selected, current, best_stats = 0, pruner.snapshot(), stats
        best = current
        if directory:
            save_checkpoint(directory, pruner, records[0], stats, config, scale, generators)
        for cb in callbacks:
            cb(records[0], model)
    dense = records[0].accuracy
    tolerance = None if config.delta is None else dense - config.delta
    metric_scale, scale = scale, _next_scale(records[-1], config)

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
            ranks.check_identical(pruner.mask_digest(), f"the masks of iteration {iteration}",
                                  "the ranks measured different statistics or held different weights before pruning; "
                                  + _SAME_WEIGHTS_HINT)
            failure, accuracy = None, None
            try:
                _retrain_with_masks(model, retrain, iteration)
            except FloatingPointError as exc:  # the built-in trainer's NaN/Inf loss, or the user's
                failure = f"retraining diverged: {exc}"
            if failure is None and (bad := pruner.nonfinite_parameters()):
                failure = f"retraining left NaN/Inf in {', '.join(bad[:3])}"
            failure = _agreed_failure(failure)
            if failure is None:
                # (FSDP2 parameters are a different slice on every rank: only the replicated ones compare)
                replicated = (p for p in model.parameters() if not is_sharded(p))
                ranks.check_identical(ranks.digest(replicated), f"the weights after retrain (iteration {iteration})",
                                      _SAME_WEIGHTS_HINT)
                accuracy = _evaluate(evaluate, model, f"evaluate (iteration {iteration})") * metric_scale
                failure = _failure(accuracy, tolerance, dense, config.delta)
            if failure is None or len(attempts) >= config.max_backoffs:
                break
            attempts.append({"zeta": config.zeta * scale if pruner.method.scalable else None,
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
        zeta = config.zeta * scale if pruner.method.scalable else 0.0
        stats_now = None if failure is not None and failure.startswith("retraining") else pruner.measure()
        record = pruner.record(iteration, accuracy, stats_now, step, failure is None, started, zeta, attempts, failure)
        records.append(record)
        if failure is not None:  # stored with the checkpoint: a rerun returns the same reason
            stop_reason = failure_stop_reason(failure, len(attempts))
        if directory:
            save_checkpoint(directory, pruner, record, stats_now if stats_now is not None else stats, config,
                            metric_scale, generators, stop_reason if failure is not None else None)
        for cb in callbacks:
            cb(record, model)
        if failure is not None:
            break
        stats = stats_now
        current = pruner.snapshot()
        if select_iteration(records, config.select) == iteration:
            selected, best, best_stats = iteration, current, stats
        scale = _next_scale(record, config)
    return _finish(pruner, records, selected, stop_reason, best, best_stats)


# The in-place verb is prune_ (like torchao's quantize_); prune is the same function, kept for the
# code written against it.
prune = prune_


def prune_step(model: nn.Module, calib_data: Iterable, *, config: PruneConfig | None = None, scale: float = 1.0,
               **measure_kwargs) -> Step:
    """One pruning step of ``config``'s method on ``model``, in place, without the loop: measure the
    rectifiers on ``calib_data``, then mask ``scale * zeta`` of the remaining weights by the
    entropy-weighted budget (NEPENTHE; IMP / EGP by their rules; EASIER replaces one activation).
    Returns what it changed (``pruned`` weights per layer, ``linearized`` sites, ``capped`` layers).
    No retraining, no evaluation, no back-off: train the model afterwards with the masks kept
    (:func:`masks_enforced`, or the fused masked optimizers)."""
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    config = config or PruneConfig()
    model = unwrap_model(model)
    refuse_foreign_pruning(model, "prune_step")
    pruner = Pruner(model, calib_data, config, measure_kwargs)
    return pruner.prune_step(pruner.measure(), scale)


def _finish(pruner: Pruner, records, selected, stop_reason, best: Snapshot, best_stats) -> PruneResult:
    """Leave the model as the selected iteration and package the result."""
    pruner.restore(best)
    with ranks.agreed("writing summary.json"):  # every rank returns once the folder is complete
        if pruner.config.checkpoint_dir and ranks.is_main():
            atomic_write_json({"selected": selected, "stop_reason": stop_reason,
                               "iterations": [r.to_dict() for r in records]},
                              Path(pruner.config.checkpoint_dir) / "summary.json")
    return PruneResult(records, selected, stop_reason, best_stats)
