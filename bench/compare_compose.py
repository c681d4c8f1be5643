"""Cost of composing two conv kernels in float64 (every conv∘conv merge candidate of fold pays it).

    .venv/bin/python bench/compare_compose.py [--threads 2] [--repeats 5]

nepenthe.fold.algebra.compose_kernels64 (one batched float64 matmul per tap) against the plain
PyTorch way, F.conv_transpose2d on float64 kernels, measured in the same run with
torch.utils.benchmark; also the wall time of folding the CIFAR ResNet-18 / VGG-16-bn with every
rectifier forced ON and every merge made (planner="all").
"""

import argparse
import time

import torch
import torch.nn.functional as F
import torch.utils.benchmark as tb

from nepenthe import fold
from nepenthe.fold.algebra import compose_kernels64
from nepenthe.fold.preview import forced_stats
from nepenthe.models import resnet18_cifar, vgg16_bn_cifar


def best_ms(stmt: str, env: dict, repeats: int, threads: int) -> float:
    timer = tb.Timer(stmt, globals=env, num_threads=threads)
    timer.timeit(1)  # warm-up
    return min(timer.timeit(1).median for _ in range(repeats)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; best of {args.repeats}")
    print("| kernels (O×M×C, 3×3∘3×3) | conv_transpose2d float64 ms | compose_kernels64 ms | speed-up |")
    print("|---|---|---|---|")
    for ch in (64, 128, 256, 512):
        env = dict(F=F, compose=compose_kernels64, w2=torch.randn(ch, ch, 3, 3, dtype=torch.float64),
                   w1=torch.randn(ch, ch, 3, 3, dtype=torch.float64))
        plain = best_ms("F.conv_transpose2d(w2, w1)", env, args.repeats, args.threads)
        ours = best_ms("compose(w2, w1, (1, 1))", env, args.repeats, args.threads)
        print(f"| {ch}×{ch}×{ch} | {plain:.1f} | {ours:.1f} | {plain / ours:.1f}× |")
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
