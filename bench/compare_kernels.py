"""The kernel numbers in RESULTS.md: every provider of a case timed in interleaved blocks.

    .venv/bin/python bench/compare_kernels.py [--threads 2] [--repeats 15] [--quick] [--csv bench/compare_kernels.csv]

Prints a markdown table per case (median and IQR in ms, and each provider's time relative to
nepenthe's) and checks the issue's CPU targets: sign_histogram >= 5x the best plain eager PyTorch
expression on 256x64x56x56 fp32; measure of the CIFAR ResNet-18 (batch 64) <= 1.15x the eval
forwards; masked SGD step <= 1.10x the unmasked torch.optim.SGD(foreach=True) step.
"""

import argparse
import csv
import sys
from pathlib import Path

import torch

import nepenthe
from nepenthe.latency import compare_calls
from nepenthe.ops import backends

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_cases import activation_case, adamw_case, histogram_case, measure_case, sgd_case  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="small sizes, no torch.compile (a smoke run)")
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    big = (16, 16, 28, 28) if args.quick else (256, 64, 56, 56)
    cases = {}
    for size in ([big] if args.quick else [(32, 64, 28, 28), big]):
        for layout in ("nchw", "channels_last"):
            name = f"sign_histogram {'x'.join(map(str, size))} {layout}"
            cases[name] = lambda s=size, cl=layout == "channels_last": histogram_case(s, channels_last=cl,
                                                                                      device=device)
    for kind in ("relu", "gelu"):
        cases[f"activation+histogram {kind} {'x'.join(map(str, big))}"] = \
            lambda k=kind: activation_case(k, big, device=device)
    cases["masked SGD step (ResNet-18 params)"] = lambda: sgd_case(device)
    cases["masked AdamW step (ResNet-18 params)"] = lambda: adamw_case(device)
    cases["measure ResNet-18 batch 64 (4 batches)"] = lambda: measure_case(64 if not args.quick else 4, 4, device)
    cases["measure ResNet-18 batch 1 (16 batches)"] = lambda: measure_case(1, 16 if not args.quick else 2, device)

    print(f"device {device}, threads {args.threads}, torch {torch.__version__}, nepenthe {nepenthe.__version__}, "
          f"backends {[k for k, v in backends.available_backends().items() if v is None]}")
    rows = []
    for name, build in cases.items():
        providers = build()
        if args.quick:
            providers = {k: v for k, v in providers.items() if not k.startswith("compile")}
        results = compare_calls(providers, repeats=args.repeats, threads=args.threads, device=device)
        ref = results[next(k for k in results if k.startswith("nepenthe"))].median_ms
        print(f"\n#### {name}\n\n| provider | median ms (IQR) | time / nepenthe |\n|---|---|---|")
        for provider, r in results.items():
            print(f"| {provider} | {r.median_ms:.3f} ({r.iqr_ms:.3f}) | {r.median_ms / ref:.2f} |")
            rows.append(dict(case=name, provider=provider, median_ms=r.median_ms, iqr_ms=r.iqr_ms,
                             relative_to_nepenthe=r.median_ms / ref, device=r.device, threads=args.threads))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
