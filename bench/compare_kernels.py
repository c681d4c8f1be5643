"""The kernel numbers in RESULTS.md: every provider of a case timed in interleaved blocks.

    .venv/bin/python bench/compare_kernels.py [--threads 2] [--repeats 15] [--quick] [--csv bench/compare_kernels.csv]
        [--only optim] [--providers nepenthe,torch_fused_unmasked]

Prints a markdown table per case (median and IQR in ms, and each provider's time relative to
nepenthe's) and checks the issue's CPU targets: sign_histogram >= 5x the best plain eager PyTorch
expression on 256x64x56x56 fp32; measure of the CIFAR ResNet-18 (batch 64) <= 1.15x the eval
forwards; masked SGD / AdamW steps (ResNet-18 parameters, fp32 and bf16, with and without weight
decay) <= 1.05x torch's fused unmasked step (``torch_fused_unmasked``: SGD/AdamW(fused=True)); the
optimizer cases end with a summary table of nepenthe / torch_fused_unmasked. ``--only optim`` runs
the optimizer cases alone.
"""

import argparse
import csv
import sys
from pathlib import Path

import torch

import nepenthe
from nepenthe.latency import compare_calls
from nepenthe.ops import backends

FUSED_TARGET = 1.05  # masked optimizer step / torch's fused unmasked step (issue 11)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_cases import activation_case, adamw_case, histogram_case, measure_case, sgd_case  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="small sizes, no torch.compile (a smoke run)")
    parser.add_argument("--csv", default=None)
    parser.add_argument("--only", choices=["optim"], default=None, help="run the masked optimizer cases only")
    parser.add_argument("--providers", default=None,
                        help="comma-separated providers to time (default all), e.g. nepenthe,torch_fused_unmasked")
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
    cases["measure ResNet-18 batch 64 (4 batches)"] = lambda: measure_case(64 if not args.quick else 4, 4, device)
    cases["measure ResNet-18 batch 1 (16 batches)"] = lambda: measure_case(1, 16 if not args.quick else 2, device)
    if args.only == "optim":
        cases = {}
    for opt, build_case, wd in (("SGD", sgd_case, 5e-4), ("AdamW", adamw_case, 1e-2)):
        for dtype in (torch.float32, torch.bfloat16):
            for decay in (wd, 0.0):
                name = f"masked {opt} step (ResNet-18 params, {str(dtype).split('.')[-1]}, weight_decay {decay:g})"
                cases[name] = lambda b=build_case, d=dtype, w=decay: b(device, d, w)

    print(f"device {device}, threads {args.threads}, torch {torch.__version__}, nepenthe {nepenthe.__version__}, "
          f"backends {[k for k, v in backends.available_backends().items() if v is None]}")
    rows = []
    summary = []  # (case, nepenthe ms, torch_fused_unmasked ms)
    for name, build in cases.items():
        providers = build()
        if args.quick:
            providers = {k: v for k, v in providers.items() if not k.startswith("compile")}
        if args.providers:
            wanted = args.providers.split(",")
            providers = {k: v for k, v in providers.items() if k in wanted or k.startswith("nepenthe")}
        results = compare_calls(providers, repeats=args.repeats, threads=args.threads, device=device)
        ref = results[next(k for k in results if k.startswith("nepenthe"))].median_ms
        print(f"\n#### {name}\n\n| provider | median ms (IQR) | time / nepenthe |\n|---|---|---|")
        for provider, r in results.items():
            print(f"| {provider} | {r.median_ms:.3f} ({r.iqr_ms:.3f}) | {r.median_ms / ref:.2f} |")
            rows.append(dict(case=name, provider=provider, median_ms=r.median_ms, iqr_ms=r.iqr_ms,
                             relative_to_nepenthe=r.median_ms / ref, device=r.device, threads=args.threads))
        if "torch_fused_unmasked" in results:
            fused = results["torch_fused_unmasked"].median_ms
            summary.append((name, ref, fused))
            print(f"\nnepenthe / torch_fused_unmasked: {ref / fused:.3f} (target <= {FUSED_TARGET})")
    if summary:
        print(f"\n#### masked optimizer steps vs torch's fused unmasked step (threads {args.threads})\n\n"
              "| case | nepenthe ms | torch_fused_unmasked ms | ratio | target |\n|---|---|---|---|---|")
        for name, ours, fused in summary:
            met = "met" if ours / fused <= FUSED_TARGET else "missed"
            print(f"| {name} | {ours:.3f} | {fused:.3f} | {ours / fused:.3f} | {met} |")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
