"""The ``nepenthe`` console script.

    nepenthe run --dataset digits --model mlp --out runs/digits-mlp
"""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _run_parser(sub) -> None:
    from .data import available_datasets
    from .loop import METHODS
    from .models import available_models

    p = sub.add_parser("run", help="train dense, prune with NEPENTHE, fold, measure latency, write a report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=available_datasets())
    p.add_argument("--model", default="mlp", choices=available_models())
    p.add_argument("--out", default="runs/digits-mlp", help="output folder (report.json, entropy.png, folded/)")
    p.add_argument("--data-root", default=None, help="folder holding the dataset files (default: where installed)")
    p.add_argument("--data-limit", type=int, default=None, help="keep only this many samples per split")
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
    p.add_argument("--approximate", action="store_true", help="also fold zero-entropy GELU/SiLU/Hardswish")
    p.add_argument("--latency-batch", type=int, default=256)
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints left in OUT/checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run(args) -> int:
    from .loop import PruneConfig
    from .pipeline import RunConfig, run
    from .train import TrainConfig

    cfg = RunConfig(
        dataset=args.dataset, model=args.model, out=args.out, data_root=args.data_root, data_limit=args.data_limit,
        val_fraction=args.val_fraction, seed=args.seed, device=args.device, batch_size=args.batch_size,
        dense=TrainConfig(epochs=args.epochs, lr=args.lr),
        retrain=TrainConfig(epochs=args.retrain_epochs, lr=args.retrain_lr),
        prune=PruneConfig(method=args.method, max_iters=args.iters, zeta=args.zeta, delta=args.delta,
                          temperature=args.temperature, resume=not args.no_resume),
        approximate=args.approximate, latency_batch=args.latency_batch, threads=args.threads,
        progress=False if args.no_progress else None)
    run(cfg)
    print(f"\nwrote {cfg.out}/report.json, {cfg.out}/entropy.png and {cfg.out}/folded/")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nepenthe", description="Entropy-based pruning that removes layers.")
    parser.add_argument("--version", action="version", version=f"nepenthe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, RuntimeError, OSError) as exc:  # user-facing errors: one clear line, no traceback
        print(f"nepenthe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
