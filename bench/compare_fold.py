"""Interleaved before/after-folding latency of the collapsed residual MLPs (the numbers in RESULTS.md).

    .venv/bin/python bench/compare_fold.py [--threads 2] [--repeats 30] [--csv bench/compare_fold.csv]

Unlike pytest-benchmark, which times one case after another, this alternates timing blocks of the
two models (nepenthe.compare_latency), so that a noisy shared machine slows both alike.
"""

import argparse
import csv
import sys
from pathlib import Path

import torch

import nepenthe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fold_latency import collapsed_mlp  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for collapsed in (0, 4, 8):
        model = collapsed_mlp(collapsed)
        calib = torch.randn(512, 1, 8, 8)
        folded = nepenthe.fold(model, nepenthe.measure(model, [calib]), calib)
        for batch in (1, 256):
            before, after = nepenthe.compare_latency(model, folded, torch.randn(batch, 1, 8, 8),
                                                     repeats=args.repeats, threads=args.threads)
            rows.append(dict(collapsed_blocks=collapsed, batch=batch, before_ms=before.median_ms,
                             before_iqr_ms=before.iqr_ms, after_ms=after.median_ms, after_iqr_ms=after.iqr_ms,
                             speedup=before.median_ms / after.median_ms,
                             critical_path=f"{folded.fold_report.critical_path_before}->"
                                           f"{folded.fold_report.critical_path_after}"))
    print("| collapsed blocks | batch | pruned ms (IQR) | folded ms (IQR) | speed-up | critical path |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['collapsed_blocks']}/8 | {r['batch']} | {r['before_ms']:.3f} ({r['before_iqr_ms']:.3f}) | "
              f"{r['after_ms']:.3f} ({r['after_iqr_ms']:.3f}) | {r['speedup']:.2f}x | {r['critical_path']} |")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
