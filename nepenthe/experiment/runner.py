"""Running an experiment: every method from the same dense weights, for every seed, resumably.

For each seed the dense model is trained once (``seed<k>/dense.pt``); each method then starts
from a copy of it, prunes with its own rule (checkpointed under ``seed<k>/<method>/checkpoints``),
is folded, evaluated on the test split and timed against the dense model
(``seed<k>/<method>/result.json``). A rerun skips what is already written and resumes a method
from its last pruning checkpoint, so an interrupted study loses at most one retraining.

Fairness: every method sees the same data split, calibration batches, retraining recipe and, at
the same iteration, the same shuffling order and augmentations; only the pruning rule differs. The
same seeding makes a resumed run end as the uninterrupted one: each method starts from random states
that depend on the seed alone (not on what ran before it in the process), each retraining from the
seed and the iteration.

Under torchrun (``nepenthe experiment`` initialises the process group) every rank trains through
DistributedDataParallel on its shard of the training split, measures its shard of the calibration
batches and evaluates its shard of each split (counts summed). Rank 0 alone writes (config.json,
dense.pt, result.json, results.*) and folds and times each method, while the others wait: timing
on every rank at once would make them compete for the same cores, and the fold planner's timed
choices could then differ between ranks. Whether a file is already there is rank 0's answer, and
the other ranks read what it wrote once it is complete.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .. import distributed as ranks
from .._utils import changed_settings
from ..checkpoint import atomic_torch_save, atomic_write_json
from ..data import DataSplits, load_dataset, make_loader, unaugmented
from ..environment import environment
from ..errors import ExperimentError
from ..fold import critical_path, fold, save
from ..graph import find_sites, trace
from ..latency import compare_latency
from ..loop import prune
from ..masks import get_mask, prunable_modules
from ..models import build_model
from ..progress import progress_bar
from ..train import evaluate, train
from .config import ExperimentConfig
from .results import summarize, write_results

__all__ = ["Experiment", "fold_and_time", "Inputs", "prepare_inputs", "rectifier_count", "resolve_device",
           "run_experiment", "weight_sparsity"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _seed(seed: int, train_split) -> None:
    """Every global generator, and the training split's augmentation stream (image datasets own one,
    see :class:`nepenthe.data.ImageTensorDataset`), restarted from ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    reseed = getattr(train_split, "reseed", None)
    if reseed is not None:
        reseed(seed)


def rectifier_count(model: nn.Module) -> int:
    """Rectifier call sites the model still has (EASIER's replaced ones and folded ones are gone)."""
    return len(find_sites(trace(model, "counting rectifier layers")))


def weight_sparsity(model: nn.Module) -> float:
    """Masked fraction of all Conv/Linear weights (the same denominator for every method)."""
    total = masked = 0
    for module in prunable_modules(model).values():
        mask = get_mask(module)
        total += module.weight.numel()
        masked += 0 if mask is None else int((~mask).sum())
    return masked / total if total else 0.0


@dataclass
class Inputs:
    """Everything the methods share for one experiment: data, loaders and fixed batches."""

    data: DataSplits
    val: torch.utils.data.DataLoader
    test: torch.utils.data.DataLoader
    calib: torch.utils.data.DataLoader
    example: torch.Tensor  # the first calibration batch: fold checks exactness on it
    latency: dict[int, torch.Tensor]  # deployment batch size -> test inputs of that size


def prepare_inputs(cfg: ExperimentConfig) -> Inputs:
    d = cfg.data
    data = load_dataset(d.dataset, root=d.root, val_fraction=d.val_fraction, seed=d.split_seed, limit=d.limit,
                        **d.options)
    calib = make_loader(unaugmented(data.train), d.calib_batch_size)  # Ξ: the training split, unshuffled
    example = next(iter(calib))[0]
    most = max(cfg.latency.batches)
    test_inputs = next(iter(make_loader(data.test, most)))[0]
    if len(test_inputs) < most:  # a small test split: repeat it up to the largest deployment batch
        test_inputs = test_inputs.repeat(math.ceil(most / len(test_inputs)), *[1] * (test_inputs.dim() - 1))
    return Inputs(data, make_loader(data.val, d.eval_batch_size), make_loader(data.test, d.eval_batch_size), calib,
                  example, {b: test_inputs[:b].contiguous() for b in cfg.latency.batches})


def fold_and_time(model: nn.Module, stats, inputs: Inputs, reference: nn.Module, cfg: ExperimentConfig,
                  device: torch.device) -> tuple[nn.Module, dict]:
    """Fold ``model`` (planner timed at the first deployment batch), evaluate it on the test split
    and time it against ``reference`` at every deployment batch size."""
    started = time.perf_counter()
    deploy = inputs.latency[cfg.latency.batches[0]].to(device)
    folded = fold(model, stats, inputs.example.to(device), planner=cfg.fold.planner,
                  approximate=cfg.fold.approximate, latency_input=deploy, threads=cfg.latency.threads)
    fold_seconds = time.perf_counter() - started
    latency = {}
    for batch, x in inputs.latency.items():
        before, after = compare_latency(reference, folded, x.to(device), repeats=cfg.latency.repeats,
                                        warmup=cfg.latency.warmup, threads=cfg.latency.threads)
        latency[str(batch)] = {"before_ms": before.median_ms, "after_ms": after.median_ms,
                               "speedup": before.median_ms / after.median_ms if after.median_ms > 0 else None,
                               "before_iqr_ms": before.iqr_ms, "after_iqr_ms": after.iqr_ms}
    info = {"fold_seconds": fold_seconds, "folded_test": evaluate(folded, inputs.test, over_ranks=False),
            "rectifiers_after": rectifier_count(folded), "critical_path_after": critical_path(trace(folded)),
            "latency": latency, "fold": folded.fold_report.to_dict()}
    return folded, info


class Experiment:
    """One experiment on disk: ``run()`` does what is missing and writes the results."""

    def __init__(self, cfg: ExperimentConfig, out: str | Path, *, resume: bool = True, progress: bool | None = None,
                 echo: Callable[[str], object] = print):
        # under torchrun rank 0 speaks for every rank
        echo = echo if ranks.is_main() else (lambda *args, **kwargs: None)
        self.cfg, self.out, self.resume, self.echo = cfg, Path(out), resume, echo
        self.progress = progress
        self.device = resolve_device(cfg.latency.device)

    # ----- bookkeeping --------------------------------------------------------------------
    def _check_same_experiment(self) -> None:
        path = self.out / "config.json"
        current = json.loads(json.dumps(self.cfg.to_dict(), default=str))
        with ranks.agreed(f"checking {path}"):  # rank 0 reads and writes it; a mismatch stops every rank
            if not ranks.is_main():
                return
            if path.exists() and self.resume:
                saved = json.loads(path.read_text())
                # seeds and methods may grow between runs; everything else must match what is on disk
                strip = lambda c: {k: v for k, v in c.items() if k not in ("seeds", "methods")}  # noqa: E731
                if strip(saved) != strip(current):
                    raise ExperimentError(f"{self.out} holds results of another configuration ({path}: "
                                          f"{changed_settings(strip(saved), strip(current))}); use another --out, "
                                          "or --no-resume to start over")
            atomic_write_json(current, path)

    def _done(self, path: Path) -> bool:
        """Whether ``path`` is there to resume from, as rank 0 sees it (one answer for every rank)."""
        return ranks.from_main(self.resume and path.exists())

    def _dense(self, seed: int, inputs: Inputs, bar) -> tuple[nn.Module, dict]:
        """The dense model of ``seed``: trained once, then read back from ``seed<k>/dense.pt``."""
        cfg, path = self.cfg, self.out / f"seed{seed}" / "dense.pt"
        _seed(seed, inputs.data.train)
        model = build_model(cfg.model.name, inputs.data.input_shape, inputs.data.num_classes,
                            **cfg.model.options).to(self.device)
        if self._done(path):
            with ranks.agreed(f"reading {path}"):
                saved = torch.load(path, map_location=self.device, weights_only=True)
                model.load_state_dict(saved["model"])
            return model.eval(), saved["info"]
        started = time.perf_counter()
        bar.set_postfix_str(f"seed {seed}: dense training")
        with ranks.agreed(f"dense training (seed {seed})"):
            train(model, make_loader(inputs.data.train, cfg.data.batch_size, shuffle=True, seed=seed),
                  cfg.dense_recipe())
        info = {"seconds": time.perf_counter() - started, "val": evaluate(model, inputs.val),
                "test": evaluate(model, inputs.test), "rectifiers": rectifier_count(model),
                "critical_path": critical_path(trace(model)),
                "params": sum(p.numel() for p in model.parameters())}
        # (under torchrun: rank 0's timing, the number every rank then reads back from the file)
        info["seconds"] = ranks.from_main(info["seconds"])
        with ranks.agreed(f"writing {path}"):
            if ranks.is_main():
                atomic_torch_save({"model": model.state_dict(), "info": info}, path)
        return model.eval(), info

    def _method(self, seed: int, method: str, dense: nn.Module, dense_info: dict, inputs: Inputs, bar) -> dict:
        cfg = self.cfg
        directory = self.out / f"seed{seed}" / method
        model = copy.deepcopy(dense)
        prune_cfg = cfg.prune_config(method, checkpoint_dir=str(directory / "checkpoints"))
        prune_cfg.resume = self.resume
        recipe = cfg.retrain_recipe()

        def retrain(m: nn.Module, iteration: int) -> None:
            # the same shuffling, augmentations and seeds for every method at a given iteration
            stream = seed * 10_007 + iteration
            _seed(stream, inputs.data.train)
            train(m, make_loader(inputs.data.train, cfg.data.batch_size, shuffle=True, seed=stream), recipe)

        def on_iteration(record, _model) -> None:
            acc = "nan" if record.accuracy is None else f"{record.accuracy:.2f}"
            bar.set_postfix_str(f"seed {seed} {method}: it {record.iteration} val {acc}% "
                                f"sparsity {record.sparsity:.3f} H=0 {len(record.zero_entropy_layers)}")

        bar.set_postfix_str(f"seed {seed} {method}: pruning")
        _seed(seed, inputs.data.train)  # whether another method ran before it in this process or not
        started = begun = time.perf_counter()
        calib, limit = inputs.calib, cfg.data.calib_batches
        if ranks.is_active():  # this rank's share of the same calibration samples (measure sums the histograms)
            calib, limit = _calibration_shard(inputs.calib, limit), None
        result = prune(model, calib, retrain=retrain, evaluate=lambda m: evaluate(m, inputs.val),
                       config=prune_cfg, callbacks=[on_iteration], device=self.device,
                       **({"max_batches": limit} if limit else {}))
        prune_seconds = time.perf_counter() - started
        pruned_test = evaluate(model, inputs.test)  # every rank: a collective under torchrun
        path, row = directory / "result.json", None
        with ranks.agreed(f"folding, timing and writing {path} (on rank 0)"):
            if ranks.is_main():
                row = self._fold_row(seed, method, model, result, dense, dense_info, inputs, bar, pruned_test,
                                     prune_seconds, begun)
                atomic_write_json(json.loads(json.dumps(row, default=str)), path)
        # the other ranks: the row rank 0 wrote (complete once the agreed block has ended)
        return row if row is not None else json.loads(path.read_text())

    def _fold_row(self, seed, method, model, result, dense, dense_info, inputs, bar, pruned_test, prune_seconds,
                  begun) -> dict:
        """Fold, time and save ``model``, and the result row of ``method`` (rank 0 alone)."""
        cfg, directory = self.cfg, self.out / f"seed{seed}" / method
        bar.set_postfix_str(f"seed {seed} {method}: folding and timing")
        folded, info = fold_and_time(model, result.stats, inputs, dense, cfg, self.device)
        save(folded, directory / "folded", original=model, extra={"method": method, "seed": seed})
        record = result.selected_record
        return {
            "seed": seed, "method": method,
            "dense_test": dense_info["test"], "pruned_test": pruned_test, **info,
            "dense_val": result.dense_accuracy, "pruned_val": record.accuracy,
            "sparsity": weight_sparsity(model), "prunable_sparsity": record.sparsity,
            "zero_entropy_layers": len(record.zero_entropy_layers),
            "rectifiers_before": dense_info["rectifiers"],
            "removed": dense_info["rectifiers"] - info["rectifiers_after"],
            "critical_path_before": dense_info["critical_path"],
            "selected_iteration": result.selected, "stop_reason": result.stop_reason,
            "backoffs": result.backoffs, "retrainings": sum(1 + len(r.backoffs) for r in result.iterations[1:]),
            "prune_seconds": prune_seconds,
            "iterations": [r.to_dict() for r in result.iterations],
            "seconds": time.perf_counter() - begun,  # pruning, folding, evaluation and timing
        }

    # ----- the whole experiment ------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        started = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_same_experiment()
        if cfg.latency.threads:
            torch.set_num_threads(cfg.latency.threads)
        with ranks.agreed(f"loading the dataset {cfg.data.dataset}"):
            inputs = prepare_inputs(cfg)
        self.echo(f"experiment {cfg.name}: {cfg.model.name} on {cfg.data.dataset} "
                  f"({len(inputs.data.train)}/{len(inputs.data.val)}/{len(inputs.data.test)} train/val/test), "
                  f"seeds {cfg.seeds}, methods {cfg.methods}, epochs x{cfg.epochs_scale:g}, device {self.device}")
        rows, dense_seconds = [], 0.0
        bar = progress_bar(total=len(cfg.seeds) * (1 + len(cfg.methods)), desc=cfg.name, enabled=self.progress)
        for seed in cfg.seeds:
            dense, dense_info = self._dense(seed, inputs, bar)
            dense_seconds += dense_info["seconds"]
            bar.update(1)
            for method in cfg.methods:
                path = self.out / f"seed{seed}" / method / "result.json"
                if self._done(path):
                    row = json.loads(path.read_text())
                else:
                    row = self._method(seed, method, dense, dense_info, inputs, bar)
                rows.append(row)
                bar.update(1)
                self.echo(f"  seed {seed} {method:>8}: test {row['folded_test']:.2f}% (dense {row['dense_test']:.2f})"
                          f", removed {row['removed']}/{row['rectifiers_before']}, sparsity {row['sparsity']:.3f}, "
                          f"prune {row['prune_seconds']:.0f} s, fold {row['fold_seconds']:.1f} s")
        bar.close()
        summary = summarize(rows, cfg)
        # "seconds": the experiment's own work, whichever invocations did it (a resumed run adds up
        # what its predecessors did); "wall_seconds": this invocation alone
        work = dense_seconds + sum(r.get("seconds", r["prune_seconds"] + r["fold_seconds"]) for r in rows)
        results = {"name": cfg.name, "config": cfg.to_dict(), "summary": summary, "runs": rows,
                   "environment": environment(self.device), "seconds": work,
                   "wall_seconds": time.perf_counter() - started}
        with ranks.agreed(f"writing the results in {self.out} (on rank 0)"):
            if ranks.is_main():
                write_results(self.out, results, cfg)
        return results


def _calibration_shard(calib: torch.utils.data.DataLoader, batches: int | None) -> torch.utils.data.DataLoader:
    """This rank's share of the calibration samples one process measures (the first ``batches``
    batches of ``calib``, all of it without a limit), batched as ``calib`` is."""
    dataset = calib.dataset
    if batches:
        dataset = torch.utils.data.Subset(dataset, range(min(len(dataset), batches * calib.batch_size)))
    return ranks.shard_loader(torch.utils.data.DataLoader(dataset, batch_size=calib.batch_size,
                                                          collate_fn=calib.collate_fn))


def run_experiment(cfg: ExperimentConfig, out: str | Path, **kwargs) -> dict:
    """Run (or resume) ``cfg`` into ``out``; returns what ``out/results.json`` holds."""
    return Experiment(cfg, out, **kwargs).run()
