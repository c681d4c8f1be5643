"""The main job end to end: train dense, run NEPENTHE, fold, measure latency, write the report.

``run(RunConfig(...))`` is what ``nepenthe run`` calls; it is a plain function so that scripts and
tests can call it too.

Under torchrun (a process group of several ranks, which ``nepenthe run`` initialises itself) every
rank trains through DistributedDataParallel on its shard of the training split, measures its shard
of the calibration data (the histograms are summed) and evaluates its shard of each split (the
counts are summed), so every decision is taken on the same numbers everywhere. Rank 0 alone checks
and writes run_config.json, folds, times and writes report.json, entropy.png and folded/: folding
and timing on every rank would only make the ranks compete for the same cores (the latency figures
and the fold planner's timed choices would then be worse, and could differ between ranks). The
others wait for it and read the report it wrote; a failure on any rank stops every rank with the
same error (:func:`nepenthe.distributed.agreed`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import distributed as ranks
from . import report as reporting
from ._utils import changed_settings
from ._version import __version__
from .checkpoint import atomic_write_json
from .data import load_dataset, make_loader, unaugmented
from .environment import environment
from .errors import ConfigError
from .fold import fold, save
from .latency import compare_latency
from .loop import PruneConfig, prune
from .models import build_model
from .progress import progress_bar
from .train import TrainConfig, evaluate, train

__all__ = ["FINGERPRINT_FILE", "RunConfig", "fingerprint", "run", "summary"]


@dataclass
class RunConfig:
    """Everything the main job needs; the defaults are the bundled demo (digits, residual MLP)."""

    dataset: str = "digits"
    model: str = "mlp"
    out: str = "runs/digits-mlp"
    data_root: str | None = None
    data_limit: int | None = None
    data_options: dict = field(default_factory=dict)  # more load_dataset options (augment, image_size, ...)
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    batch_size: int = 64
    calib_batch_size: int = 512
    dense: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, lr=0.05))
    retrain: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=0.02))
    prune: PruneConfig = field(default_factory=lambda: PruneConfig(max_iters=8, delta=1.0))
    approximate: bool = False
    planner: str = "latency"
    deploy_batch: int = 1  # the batch size the fold planner times merges at (your deployment batch)
    latency_batch: int = 256
    latency_repeats: int = 30
    threads: int | None = None
    progress: bool | None = None  # None: when stderr is a terminal

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prune"].pop("filter_fn", None)
        return d


# RunConfig fields that do not decide the result (where it goes, how it is shown or timed, where the
# dataset files happen to lie) and PruneConfig's resume switches
_NOT_IN_FINGERPRINT = {"out", "progress", "threads", "latency_repeats", "data_root"}
_PRUNE_NOT_IN_FINGERPRINT = {"resume", "checkpoint_dir", "pack_masks"}  # mask storage decides no result
FINGERPRINT_FILE = "run_config.json"


def fingerprint(cfg: RunConfig) -> dict:
    """Everything that decides a run's result (data, split, seed, model, every training, pruning and
    folding setting, the package version), as JSON-able values."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IN_FINGERPRINT}
    d["prune"] = {k: v for k, v in d["prune"].items() if k not in _PRUNE_NOT_IN_FINGERPRINT}
    if not isinstance(d["prune"].get("method"), str):
        d["prune"]["method"] = cfg.prune.method_name
    d["nepenthe"] = __version__
    return json.loads(json.dumps(d, default=str))


def _check_fingerprint(cfg: RunConfig, out: Path) -> None:
    """Refuse to resume a run folder made with other settings (its checkpoints would be mixed into
    this run); write this run's fingerprint otherwise. ``--no-resume`` starts over and overwrites."""
    path = out / FINGERPRINT_FILE
    mine = fingerprint(cfg)
    if cfg.prune.resume and path.exists():
        try:
            theirs = json.loads(path.read_text())
        except (ValueError, OSError):
            theirs = None
        if theirs != mine:
            raise ConfigError(f"{out} holds a run made with other settings ({changed_settings(theirs, mine)}). "
                              "Rerun with --no-resume to start over there, or give another --out")
    atomic_write_json(mine, path)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(cfg: RunConfig, echo=print) -> dict:
    """Run the main job and return the report (also written to ``<out>/report.json``)."""
    started = time.perf_counter()
    if not ranks.is_main():  # under torchrun rank 0 speaks for every rank
        echo = lambda *args, **kwargs: None  # noqa: E731
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # rank 0 reads and writes the fingerprint; every rank stops on a mismatch
    with ranks.agreed(f"checking {out / FINGERPRINT_FILE}"):
        if ranks.is_main():
            _check_fingerprint(cfg, out)  # before any training: a mismatch costs nothing
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = _device(cfg.device)

    with ranks.agreed(f"loading the dataset {cfg.dataset}"):
        data = load_dataset(cfg.dataset, root=cfg.data_root, val_fraction=cfg.val_fraction, seed=cfg.seed,
                            limit=cfg.data_limit, **cfg.data_options)
    train_loader = make_loader(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed)
    val_loader = make_loader(data.val, 512)
    test_loader = make_loader(data.test, 512)
    calib_loader = make_loader(unaugmented(data.train), cfg.calib_batch_size)  # Ξ: the training set as it is
    model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
    echo(f"nepenthe: {cfg.model} on {cfg.dataset} ({len(data.train)}/{len(data.val)}/{len(data.test)} train/val/test)"
         f", device {device}")

    bar = progress_bar(total=cfg.dense.epochs + cfg.prune.max_iters * cfg.retrain.epochs, desc="training",
                       enabled=cfg.progress)
    tick = lambda epoch, loss: (bar.update(1), bar.set_postfix_str(f"loss {loss:.3f}"))  # noqa: E731
    with ranks.agreed("dense training"):
        train(model, train_loader, cfg.dense, progress=tick)
    dense_test = evaluate(model, test_loader)

    def on_iteration(record, _model):
        r = record.to_dict()
        echo(f"  iteration {r['iteration']}: val acc {r['accuracy']:.2f}%, sparsity {r['sparsity']:.3f}, "
             f"zero-entropy layers {len(r['zero_entropy_layers'])}/{len(r['layer_entropy'])}")

    prune_cfg = cfg.prune
    if prune_cfg.checkpoint_dir is None:
        prune_cfg.checkpoint_dir = str(out / "checkpoints")
    if prune_cfg.metric_scale is None:
        prune_cfg.metric_scale = 1.0  # train.evaluate gives percent (an untrained model may score 0)
    # train_loader shuffles (and an image split augments) with generators of its own: checkpointed with the
    # loop, a resumed run retrains on the batches the uninterrupted one drew (the dense training is redone, seeded)
    # (under torchrun each rank measures its shard of the calibration data: measure sums the histograms)
    result = prune(model, ranks.shard_loader(calib_loader),
                   retrain=lambda m, it: train(m, train_loader, cfg.retrain, progress=tick),
                   evaluate=lambda m: evaluate(m, val_loader), config=prune_cfg, callbacks=[on_iteration],
                   rng_generators=[train_loader], device=device)
    bar.close()
    pruned_test = evaluate(model, test_loader)
    records = [r.to_dict() for r in result.iterations]
    echo("\n" + reporting.iteration_table(records))
    report = None
    with ranks.agreed("folding, timing and writing the report (on rank 0)"):
        if ranks.is_main():
            report = _fold_and_report(cfg, model, result, records, data, calib_loader, test_loader, device,
                                      dense_test, pruned_test, started)
    if report is None:  # the other ranks: what rank 0 wrote (complete: it wrote before the agreed block ended)
        report = json.loads((out / "report.json").read_text())
    echo(summary(report))
    return report


def _fold_and_report(cfg: RunConfig, model, result, records, data, calib_loader, test_loader, device,
                     dense_test: float, pruned_test: float, started: float) -> dict:
    """Fold, evaluate the folded model, time it, write folded/, entropy.png and report.json (rank 0)."""
    out = Path(cfg.out)
    example = next(iter(calib_loader))[0]  # fold checks exactness on calibration data
    latency_input = next(iter(make_loader(data.test, cfg.latency_batch)))[0].to(device)
    deploy_input = next(iter(make_loader(data.test, cfg.deploy_batch)))[0].to(device)
    # the planner times merges at the deployment batch, on the threads the report uses
    folded = fold(model, result.stats, example.to(device), approximate=cfg.approximate, planner=cfg.planner,
                  latency_input=deploy_input, threads=cfg.threads)
    folded_test = evaluate(folded, test_loader, over_ranks=False)  # rank 0 alone
    fold_report = folded.fold_report

    before, after = compare_latency(model, folded, latency_input, repeats=cfg.latency_repeats, threads=cfg.threads)
    save(folded, out / "folded", extra={"dataset": cfg.dataset, "model": cfg.model})
    plot = reporting.plot_entropy(records, out / "entropy.png", title=f"NEPENTHE: {cfg.model} on {cfg.dataset}")

    report = {
        "dataset": cfg.dataset,
        "model": cfg.model,
        "dense_accuracy": dense_test,
        "pruned_accuracy": pruned_test,
        "folded_accuracy": folded_test,
        "dense_val_accuracy": result.dense_accuracy,
        "selected_iteration": result.selected,
        "stop_reason": result.stop_reason,
        "backoffs": result.backoffs,
        "sparsity": result.selected_record.sparsity,
        "rectifier_layers_total": fold_report.rectifier_layers_total,
        "rectifier_layers_removed": fold_report.rectifier_layers_removed,
        "zero_entropy_layers": result.selected_record.zero_entropy_layers,
        "latency_ms_before": before.median_ms,
        "latency_ms_after": after.median_ms,
        "latency_speedup": before.median_ms / after.median_ms if after.median_ms > 0 else None,
        "latency": {"batch_size": len(latency_input), "before": before.to_dict(), "after": after.to_dict()},
        "fold": fold_report.to_dict(),
        "iterations": records,
        "config": cfg.to_dict(),
        "environment": environment(device),
        "world_size": ranks.world_size(),  # processes that trained and measured (under torchrun)
        "plot": str(plot) if plot else None,
        "seconds": time.perf_counter() - started,
    }
    atomic_write_json(json.loads(json.dumps(report, default=str)), out / "report.json")
    return report


def summary(report: dict) -> str:
    """The before/after block printed at the end of a run."""
    f = report["fold"]
    lines = [
        "",
        "                      dense      pruned     folded",
        f"  test accuracy %    {report['dense_accuracy']:7.2f}    {report['pruned_accuracy']:7.2f}    "
        f"{report['folded_accuracy']:7.2f}",
        f"  rectifier layers removed: {report['rectifier_layers_removed']}/{report['rectifier_layers_total']}"
        f"   sparsity {report['sparsity']:.3f} (iteration {report['selected_iteration']})",
        f"  linear ops {f['linear_ops_before']} -> {f['linear_ops_after']}, critical path {f['critical_path_before']}"
        f" -> {f['critical_path_after']}, params {f['params_before']} -> {f['params_after']}",
        f"  latency (batch {report['latency']['batch_size']}): {report['latency_ms_before']:.3f} ms -> "
        f"{report['latency_ms_after']:.3f} ms ({report['latency_speedup']:.2f}x)",
        f"  fold max relative error on calibration batch: {f['max_rel_error']:.2e}",
        f"  stop: {report['stop_reason']} ({report.get('backoffs', 0)} back-off(s) in all)",
    ]
    if f.get("returned", "folded") != "folded":  # the planner handed back something else: say so
        lines.append(f"  fold returned the {f['returned'].replace('_', ' ')} model: {f.get('returned_reason', '')}")
    return "\n".join(lines)
