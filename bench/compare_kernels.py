"""The kernel numbers in RESULTS.md: every provider of a case timed in interleaved blocks.

    .venv/bin/python bench/compare_kernels.py [--threads 2] [--repeats 15] [--quick] [--csv bench/compare_kernels.csv]
        [--only histogram,activation,optim,measure] [--providers torch_sum,torch_activation_only,torch_fused_unmasked]

Prints a markdown table per case (median and IQR in ms, and each provider's time relative to
nepenthe's; GB/s read for the histograms) and checks the issue's CPU targets: sign_histogram >= 5x the
best plain eager PyTorch expression on 256x64x56x56 fp32, and >= 85% of torch.sum's read rate for
fp32/bf16/fp16 (NCHW, channels_last, Linear-like [rows, C]); the fused GELU / GELU-tanh / SiLU +
histogram <= 1.10x the plain activation alone (fp32 and bf16); measure of the CIFAR ResNet-18
(batch 64 and batch 1) <= 1.15x the eval forwards; masked SGD / AdamW steps (ResNet-18 parameters,
fp32 and bf16, with and without weight decay) <= 1.05x torch's fused unmasked step
(``torch_fused_unmasked``: SGD/AdamW(fused=True)); the optimizer cases end with a summary table.
The cases live in kernel_cases.py (shared with bench_kernels.py, pytest-benchmark, and the GPU
suite); timing and the CSV are the package's (``nepenthe.benchmark.compare_providers``, the
measurement schema).
"""

import argparse
import sys
from pathlib import Path

import torch

import nepenthe
from nepenthe.benchmark import compare_providers, markdown_table, write_measurements
from nepenthe.ops import backends

FUSED_TARGET = 1.05  # masked optimizer step / torch's fused unmasked step (issue 11)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_cases import activation_case, adamw_case, bytes_read, histogram_case, measure_case, sgd_case  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="small sizes, no torch.compile (a smoke run)")
    parser.add_argument("--csv", default=None)
    parser.add_argument("--only", default="histogram,activation,optim,measure",
                        help="comma-separated groups of cases to run")
    parser.add_argument("--providers", default=None,
                        help="comma-separated providers to time (default: all; nepenthe is always kept)")
    args = parser.parse_args()
    groups = set(args.only.split(","))
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    big = (16, 16, 28, 28) if args.quick else (256, 64, 56, 56)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    cases, nbytes = {}, {}
    if "histogram" in groups:
        for size in ([big] if args.quick else [(32, 64, 28, 28), big]):
            for dname, dtype in dtypes.items():
                if size != big and dname != "fp32":
                    continue
                rows = (size[0] * size[2] * size[3], size[1])  # Linear-like [rows, C], the same elements
                for layout, shape in (("nchw", size), ("channels_last", size), ("2d", rows)):
                    name = f"sign_histogram {'x'.join(map(str, shape))} {dname} {layout}"
                    cases[name] = lambda s=shape, d=dtype, cl=layout == "channels_last": histogram_case(
                        s, d, channels_last=cl, device=device)
                    nbytes[name] = bytes_read(shape, dtype)
    if "activation" in groups:
        for dname in ("fp32", "bf16"):
            for kind in ("relu", "gelu", "gelu_tanh", "silu"):
                cases[f"activation+histogram {kind} {'x'.join(map(str, big))} {dname}"] = \
                    lambda k=kind, d=dtypes[dname]: activation_case(k, big, d, device=device)
    if "optim" in groups:
        for opt, build_case, wd in (("SGD", sgd_case, 5e-4), ("AdamW", adamw_case, 1e-2)):
            for dtype in (torch.float32, torch.bfloat16):
                for decay in (wd, 0.0):
                    name = f"masked {opt} step (ResNet-18 params, {str(dtype).split('.')[-1]}, weight_decay {decay:g})"
                    cases[name] = lambda b=build_case, d=dtype, w=decay: b(device, d, w)
    if "measure" in groups:
        cases["measure ResNet-18 batch 64 (4 batches)"] = lambda: measure_case(64 if not args.quick else 4, 4, device)
        cases["measure ResNet-18 batch 1 (16 batches)"] = lambda: measure_case(1, 16 if not args.quick else 2, device)

    print(f"device {device}, threads {args.threads}, torch {torch.__version__}, nepenthe {nepenthe.__version__}, "
          f"backends {[k for k, v in backends.available_backends().items() if v is None]}")
    rows = []
    summary = []  # (case, nepenthe ms, torch_fused_unmasked ms)
    for name, build in cases.items():
        providers = build()
        if args.quick:
            providers = {k: v for k, v in providers.items() if not k.startswith("compile")}
        if args.providers:
            keep = set(args.providers.split(","))
            providers = {k: v for k, v in providers.items() if k in keep or k.startswith("nepenthe")}
        case_rows = compare_providers(name, providers, suite="kernels", repeats=args.repeats, threads=args.threads,
                                      device=device, nbytes=nbytes.get(name))
        rows += case_rows
        print(f"\n#### {name}\n\n{markdown_table(case_rows)}")
        timed = {r["provider"]: r for r in case_rows if not r["error"]}
        ours = next((r for p, r in timed.items() if p.startswith("nepenthe")), None)
        if ours is None:
            continue
        ref = ours["median_ms"]
        if nbytes.get(name) and "torch_sum" in timed:
            share = timed["torch_sum"]["median_ms"] / ref * 100
            print(f"\nnepenthe reads at {share:.0f}% of torch.sum's rate (target >= 85%)")
        if "torch_activation_only" in timed:
            ratio = ref / timed["torch_activation_only"]["median_ms"]
            print(f"\nfused / plain activation: {ratio:.2f} (target <= 1.10)")
        if "torch_fused_unmasked" in timed:
            fused = timed["torch_fused_unmasked"]["median_ms"]
            summary.append((name, ref, fused))
            print(f"\nnepenthe / torch_fused_unmasked: {ref / fused:.3f} (target <= {FUSED_TARGET})")
    if summary:
        print(f"\n#### masked optimizer steps vs torch's fused unmasked step (threads {args.threads})\n\n"
              "| case | nepenthe ms | torch_fused_unmasked ms | ratio | target |\n|---|---|---|---|---|")
        for name, ours, fused in summary:
            met = "met" if ours / fused <= FUSED_TARGET else "missed"
            print(f"| {name} | {ours:.3f} | {fused:.3f} | {ours / fused:.3f} | {met} |")
    if args.csv:
        write_measurements(rows, args.csv)


if __name__ == "__main__":
    main()
