"""The ``nepenthe`` console script.

    nepenthe run --dataset digits --model mlp --out runs/digits-mlp
    nepenthe bench --scenarios resnet18,mlp_block --batches 1,32 --modes eager --threads 2 --out bench-out
    torchrun --nproc-per-node 2 -m nepenthe run --dataset digits --model mlp --out runs/digits-mlp

``run`` and ``experiment`` under torchrun (its RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in the
environment) initialise the process group themselves (gloo on the CPU, NCCL on CUDA with device
LOCAL_RANK) and destroy it at the end; only rank 0 prints and writes files.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys

from ._version import __version__
from .errors import NepentheError

__all__ = ["main"]


def _json_flag(parser, what: str) -> None:
    parser.add_argument("--json", action="store_true",
                        help=f"print {what} as one JSON object on stdout (everything else goes to stderr)")


def _worker() -> bool:
    """A rank other than 0 under torchrun: it prints nothing but errors (rank 0 speaks for all)."""
    return os.environ.get("RANK", "0") not in ("", "0")


def _quiet_stdout(args):
    """With --json, what the command prints for people goes to stderr: stdout holds the JSON only."""
    if _worker():
        return contextlib.redirect_stdout(open(os.devnull, "w"))  # noqa: SIM115 - closed with the process
    return contextlib.redirect_stdout(sys.stderr) if getattr(args, "json", False) else contextlib.nullcontext()


@contextlib.contextmanager
def _torchrun(device: str):
    """Under torchrun, the process group for the command's lifetime: NCCL when ``device`` is CUDA
    (``--device cuda``, or auto on a machine with one; each rank on cuda:LOCAL_RANK), gloo otherwise.
    Nothing when the variables torchrun sets are absent, or a group already exists (a script that
    calls main() from its own torchrun'd code keeps its group)."""
    needed = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    if not all(os.environ.get(k) for k in needed):
        yield
        return
    import torch
    import torch.distributed as dist

    from .distributed import barrier

    if dist.is_initialized():
        yield
        return
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if device not in ("cuda", "auto") and int(os.environ["WORLD_SIZE"]) > 1:
            raise ValueError(f"--device {device} under torchrun: give --device cuda, each rank then uses "
                             "cuda:LOCAL_RANK")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield
        # every rank tears the group down together: a rank whose gloo pairs close while another is
        # still finishing its last collective can abort in gloo's threads (std::terminate)
        barrier()
    finally:
        # Objects that still hold the group (a DDP reducer in a reference cycle, a device mesh) are
        # freed while it is alive: left to the interpreter's teardown, they made a finished gloo rank
        # abort ("terminate called without an active exception") in about 1 process in 100 even
        # after the barrier, 1 in 20 without it; with this collection, none in 100.
        gc.collect()
        dist.destroy_process_group()


_HEADLINE = ("dense_accuracy", "pruned_accuracy", "folded_accuracy", "rectifier_layers_total",
             "rectifier_layers_removed", "latency_ms_before", "latency_ms_after", "latency_speedup",
             "selected_iteration", "stop_reason", "sparsity")


def _run_parser(sub) -> None:
    from .data import available_datasets
    from .loop import METHODS
    from .models import available_models

    p = sub.add_parser("run", help="train dense, prune with NEPENTHE, fold, measure latency, write a report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=available_datasets(),
                   type=lambda name: name.replace("-", "_"))  # fashion-mnist, as people type it
    p.add_argument("--model", default="mlp", choices=available_models())
    p.add_argument("--out", default="runs/digits-mlp", help="output folder (report.json, entropy.png, folded/)")
    _json_flag(p, "the report's headline numbers")
    p.add_argument("--data-root", default=None, help="folder holding the dataset files (default: where installed)")
    p.add_argument("--data-limit", type=int, default=None, help="keep only this many samples per split")
    p.add_argument("--augment", action="store_true",
                   help="augment the training split (crop + flip; image datasets only; calibration never is)")
    p.add_argument("--image-size", type=int, default=None, help="resize images to this side (image-folder datasets)")
    p.add_argument("--test-domain", default=None, help="pacs / vlcs: leave this domain out as the test split")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="intra-op CPU threads (default: torch's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=30, help="dense training epochs")
    p.add_argument("--lr", type=float, default=0.05, help="dense training learning rate")
    p.add_argument("--retrain-epochs", type=int, default=10, help="retraining epochs per iteration")
    p.add_argument("--retrain-lr", type=float, default=0.02)
    p.add_argument("--method", default="nepenthe", choices=METHODS)
    p.add_argument("--iters", type=int, default=8, help="maximum pruning iterations")
    p.add_argument("--zeta", type=float, default=0.5, help="fraction of remaining weights pruned per iteration")
    p.add_argument("--delta", type=float, default=1.0, help="stop when val accuracy < dense - delta (points)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the budget")
    p.add_argument("--normalize", default="fan_in", choices=["none", "fan_in"],
                   help="scale the budget's magnitude term by sqrt(fan-in) (see README: the pruning budget)")
    p.add_argument("--protect", type=_csv_list("layer"), default=[],
                   help="comma-separated layer names / glob patterns never pruned; 'first', 'last' for the linear "
                        "ops next to the input / output")
    p.add_argument("--max-backoffs", type=int, default=3,
                   help="retries of a step that fails delta or diverges, each with half the pruning amount")
    p.add_argument("--select", default="depth", choices=["depth", "last"],
                   help="which iteration within tolerance to keep: most collapsed layers, or the last")
    p.add_argument("--approximate", action="store_true", help="also fold zero-entropy GELU/SiLU/Hardswish")
    p.add_argument("--planner", default="latency", choices=["latency", "all", "none"], help="fold planner")
    p.add_argument("--deploy-batch", type=int, default=1, help="batch size the fold planner times merges at")
    p.add_argument("--latency-batch", type=int, default=256)
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints left in OUT/checkpoints")
    p.add_argument("--pack-masks", action="store_true",
                   help="store the masks bit-packed (1/8 byte per weight; the results are the same)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# run's numeric flags: (smallest allowed, largest allowed or None, whether the bound itself is allowed)
_RUN_RANGES = {
    "data_limit": (1, None), "image_size": (1, None), "threads": (1, None), "batch_size": (1, None),
    "epochs": (0, None), "retrain_epochs": (0, None), "iters": (0, None), "max_backoffs": (0, None),
    "deploy_batch": (1, None), "latency_batch": (1, None),
}


def _check_run_flags(args) -> None:
    """ValueError naming the flag for a value the run cannot use (before any data is loaded)."""
    for name, (low, high) in _RUN_RANGES.items():
        value = getattr(args, name)
        if value is not None and (value < low or (high is not None and value > high)):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if not 0.0 < args.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if not 0.0 < args.zeta <= 1.0:
        raise ValueError(f"--zeta must be in (0, 1], got {args.zeta}")
    for flag, value in (("--lr", args.lr), ("--retrain-lr", args.retrain_lr), ("--temperature", args.temperature)):
        if not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
    if args.device != "auto":
        import torch

        try:
            device = torch.device(args.device)
        except RuntimeError as exc:
            raise ValueError(f"--device {args.device!r} is not a device ({exc}); use auto, cpu, cuda or "
                             "cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: this machine has no usable CUDA device; use --device cpu "
                             "(or auto)")


def _check_out(out: str) -> None:
    """ValueError naming --out when the output folder cannot be one (a file, an unwritable place);
    the folder is created here, so that a run never trains first and fails on its first write."""
    from pathlib import Path

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out} is a file; name a folder (it is created when missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: the folder cannot be created ({exc.strerror or exc}); choose a writable "
                         "place") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out} is not writable; choose another folder")


def _run(args) -> int:
    from .loop import PruneConfig
    from .pipeline import RunConfig, run
    from .train import TrainConfig

    _check_run_flags(args)
    _check_out(args.out)

    data_options = {k: v for k, v in (("augment", args.augment or None), ("image_size", args.image_size),
                                      ("test_domain", args.test_domain)) if v is not None}
    cfg = RunConfig(
        dataset=args.dataset, model=args.model, out=args.out, data_root=args.data_root, data_limit=args.data_limit,
        data_options=data_options,
        val_fraction=args.val_fraction, seed=args.seed, device=args.device, batch_size=args.batch_size,
        dense=TrainConfig(epochs=args.epochs, lr=args.lr),
        retrain=TrainConfig(epochs=args.retrain_epochs, lr=args.retrain_lr),
        prune=PruneConfig(method=args.method, max_iters=args.iters, zeta=args.zeta, delta=args.delta,
                          temperature=args.temperature, normalize=args.normalize, protect=tuple(args.protect),
                          max_backoffs=args.max_backoffs, select=args.select, resume=not args.no_resume,
                          pack_masks=args.pack_masks),
        approximate=args.approximate, planner=args.planner, deploy_batch=args.deploy_batch,
        latency_batch=args.latency_batch, threads=args.threads,
        progress=False if args.no_progress else None)
    with _torchrun(args.device), _quiet_stdout(args):
        run(cfg)
        print(f"\nwrote {cfg.out}/report.json, {cfg.out}/entropy.png and {cfg.out}/folded/")
    if args.json and not _worker():
        from pathlib import Path

        report = json.loads((Path(cfg.out) / "report.json").read_text())
        print(json.dumps({"out": str(cfg.out), **{k: report.get(k) for k in _HEADLINE}}))
    return 0


def _csv_list(kind: str, cast=str):
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"give at least one {kind}")
        try:
            return [cast(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{kind}s must be a comma-separated list, got {text!r}") from None
    return parse


def _bench_parser(sub) -> None:
    from .benchmark import DEFAULT_BATCHES, MODES, available_scenarios

    p = sub.add_parser("bench", help="latency before/after folding of the paper's models (batch sweep, eager "
                       "and torch.compile); writes bench.json, bench.csv, bench.png",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scenarios", type=_csv_list("scenario"), default=list(available_scenarios()),
                   help=f"comma-separated, from {','.join(available_scenarios())}")
    p.add_argument("--batches", type=_csv_list("batch size", int), default=list(DEFAULT_BATCHES),
                   help="comma-separated batch sizes")
    p.add_argument("--modes", type=_csv_list("mode"), default=list(MODES),
                   help=f"comma-separated, from {','.join(MODES)}")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="intra-op CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=10, help="timing blocks per model (median and IQR over them)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls per model before timing")
    p.add_argument("--planner", default=None, choices=["latency", "all", "none"],
                   help="fold planner for every scenario (default: each scenario's; ignored by a fold without one)")
    p.add_argument("--fold-batch", type=int, default=None,
                   help="fold once per scenario on a batch of this size (default: fold at each batch size)")
    p.add_argument("--out", default="bench-out", help="output folder (bench.json, bench.csv, bench.png)")
    _json_flag(p, "each row's timings and the targets")


def _bench(args) -> int:
    from .benchmark import MODES, available_scenarios, main_bench

    unknown = [s for s in args.scenarios if s not in available_scenarios()]
    if unknown:
        raise ValueError(f"unknown scenario {unknown[0]!r}; choose from {', '.join(available_scenarios())}")
    bad = [b for b in args.batches if b < 1]
    if bad:
        raise ValueError(f"batch sizes must be >= 1, got {bad[0]}")
    modes = [m for m in args.modes if m not in MODES]
    if modes:
        raise ValueError(f"unknown mode {modes[0]!r}; choose from {', '.join(MODES)}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.fold_batch is not None and args.fold_batch < 1:
        raise ValueError(f"--fold-batch must be >= 1, got {args.fold_batch}")
    _check_out(args.out)  # last: it creates the folder
    with _quiet_stdout(args):
        result = main_bench(args.scenarios, args.batches, args.modes, args.device, args.threads, args.repeats,
                            args.warmup, args.out, planner=args.planner, fold_batch=args.fold_batch)
    if args.json:
        from .benchmark import check_targets

        keys = ("scenario", "batch", "mode", "before_ms", "after_ms", "speedup", "flops_ratio", "returned", "error")
        print(json.dumps({"out": str(args.out), "rows": [{k: r.get(k) for k in keys} for r in result["rows"]],
                          "targets": check_targets(result)}, default=str))
    return 0


def _experiment_parser(sub) -> None:
    p = sub.add_parser("experiment", help="run a paper-protocol experiment from a TOML configuration: dense training "
                       "once per seed, every method from the same weights, results table and plots",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("config", nargs="?", help="a .toml file, or the name of a shipped configuration (see --list)")
    p.add_argument("--list", action="store_true", help="list the shipped configurations and exit")
    p.add_argument("--out", default=None, help="output folder (default: runs/<config name>)")
    _json_flag(p, "what results.json holds")
    p.add_argument("--epochs-scale", type=float, default=None,
                   help="multiply every training duration (dense and retraining epochs, milestones) by this")
    p.add_argument("--seeds", type=_csv_list("seed", int), default=None, help="comma-separated; overrides the config")
    p.add_argument("--methods", type=_csv_list("method"), default=None, help="comma-separated; overrides the config")
    p.add_argument("--data-root", default=None, help="folder holding the dataset files; overrides the config")
    p.add_argument("--threads", type=int, default=None, help="intra-op CPU threads; overrides the config")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, ...; overrides the config")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming what OUT holds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _experiment(args) -> int:
    from .experiment import from_dict, load_config, run_experiment, shipped_configs

    if args.list:
        for name, path in shipped_configs().items():
            first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "# ")
            print(f"{name:<24} {first[1:].strip()}")
        return 0
    if not args.config:
        raise ValueError("give a configuration (a .toml file or a shipped name; --list shows them)")
    cfg = load_config(args.config)
    raw = cfg.to_dict()
    if args.seeds is not None:
        cfg.seeds = args.seeds
    if args.methods is not None:
        cfg.methods = args.methods
    if args.epochs_scale is not None:
        if not args.epochs_scale > 0:
            raise ValueError(f"--epochs-scale must be > 0, got {args.epochs_scale}")
        cfg.epochs_scale = args.epochs_scale
    if args.data_root is not None:
        cfg.data.root = args.data_root
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        cfg.latency.threads = args.threads
    if args.device is not None:
        cfg.latency.device = args.device
    if cfg.to_dict() != raw:  # validate the overridden values as a config file would be
        cfg = from_dict(_toml_shaped(cfg))
    out = args.out or f"runs/{cfg.name}"
    _check_out(out)
    with _torchrun(cfg.latency.device), _quiet_stdout(args):
        results = run_experiment(cfg, out, resume=not args.no_resume, progress=False if args.no_progress else None)
        from .experiment.results import markdown_table

        print("\n" + markdown_table(results))
        print(f"\nwrote {out}/results.md, results.csv, results.json, accuracy_vs_removed.png, entropy.png")
    if args.json and not _worker():
        print(json.dumps(results, default=str))
    return 0


def _toml_shaped(cfg) -> dict:
    """An ExperimentConfig back in the shape of its TOML file (to re-validate overrides)."""
    d = cfg.to_dict()
    prune = dict(d.pop("prune"))
    prune["methods"] = d.pop("method_overrides")
    return {**d, "prune": prune}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nepenthe", description="Entropy-based pruning that removes layers.")
    parser.add_argument("--version", action="version", version=f"nepenthe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    _bench_parser(sub)
    _experiment_parser(sub)
    args = parser.parse_args(argv)
    commands = {"run": _run, "bench": _bench, "experiment": _experiment}
    # user-facing errors: one clear line, no traceback. Exit status 2: the command was given something
    # it cannot use (bad values, a missing file or dataset: argparse's own usage errors are 2 too);
    # 1: the run itself failed (a pruning, folding, I/O or backend error).
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        again = (f"; rerun the same command to resume from the checkpoints in {out}" if out and args.command != "bench"
                 else "")
        print(f"\nnepenthe {args.command}: interrupted{again}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as exc:
        print(f"nepenthe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (NepentheError, RuntimeError, OSError) as exc:
        kinds = getattr(exc, "kinds", None)  # a RankError: every rank exits as the first failing one would
        if kinds and {"ValueError", "FileNotFoundError"} & set(next(iter(kinds.values()))):
            print(f"nepenthe {args.command}: error: {_rank_text(exc)}", file=sys.stderr)
            return 2
        print(f"nepenthe {args.command}: failed: {_rank_text(exc)}", file=sys.stderr)
        return 1


def _rank_text(exc: BaseException) -> str:
    """An error as one line; a RankError whose ranks all failed the same way says it once."""
    failures = getattr(exc, "failures", None)
    everyone = f"failed on {len(failures or ())} of {len(failures or ())} rank(s)" in str(exc)
    if failures and len(failures) > 1 and everyone and len(set(failures.values())) == 1:
        what = str(exc).split(" failed on ")[0]
        return f"{what} failed on every rank ({len(failures)}): {next(iter(failures.values()))}"
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
