"""Cost of composing two conv kernels in float64 (every conv∘conv merge candidate of fold pays it).

    .venv/bin/python bench/compare_compose.py [--threads 2] [--repeats 5] [--csv compose.csv]

nepenthe.fold.algebra.compose_kernels64 (one batched float64 matmul per tap) against the plain
PyTorch way, F.conv_transpose2d on float64 kernels, timed against each other in one run
(``nepenthe.benchmark.compare_providers``: interleaved blocks; ``--csv`` writes the measurement
schema); also the wall time of folding the CIFAR ResNet-18 / VGG-16-bn with every rectifier forced
ON and every merge made (planner="all").
"""

import argparse
import time

import torch
import torch.nn.functional as F

from nepenthe import fold
from nepenthe.benchmark import compare_providers, write_measurements
from nepenthe.fold.algebra import compose_kernels64
from nepenthe.fold.preview import forced_stats
from nepenthe.models import resnet18_cifar, vgg16_bn_cifar


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; medians of {args.repeats} interleaved blocks")
    print("| kernels (O×M×C, 3×3∘3×3) | conv_transpose2d float64 ms | compose_kernels64 ms | speed-up |")
    print("|---|---|---|---|")
    rows = []
    for ch in (64, 128, 256, 512):
        w2, w1 = (torch.randn(ch, ch, 3, 3, dtype=torch.float64) for _ in range(2))
        case = compare_providers(f"compose {ch}x{ch}x{ch} 3x3", {
            "nepenthe": lambda w2=w2, w1=w1: compose_kernels64(w2, w1, (1, 1)),
            "torch_conv_transpose2d": lambda w2=w2, w1=w1: F.conv_transpose2d(w2, w1)},
            suite="compose", repeats=args.repeats, warmup=1, threads=args.threads)
        rows += case
        timed = {r["provider"]: r["median_ms"] for r in case if not r["error"]}
        if len(timed) < 2:
            print(f"| {ch}×{ch}×{ch} | {case[0]['error']} | | |")
            continue
        plain, ours = timed["torch_conv_transpose2d"], timed["nepenthe"]
        print(f"| {ch}×{ch}×{ch} | {plain:.1f} | {ours:.1f} | {plain / ours:.1f}× |")
    if args.csv:
        write_measurements(rows, args.csv)
    for build in (resnet18_cifar, vgg16_bn_cifar):
        torch.manual_seed(0)
        model = build().eval()
        x = torch.randn(2, 3, 32, 32)
        stats = forced_stats(model, x, {s: "on" for s in forced_stats(model, x).histogram})
        start = time.perf_counter()
        folded = fold(model, stats, x, planner="all", verify=False)
        print(f"fold {build.__name__} (planner='all', {folded.fold_report.ops_merged} merges): "
              f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
