"""Bit-packed masks on the model vs bool masks: memory per parameter and masked optimizer step time.

    PYTHONPATH=. .venv/bin/python bench/bench_packed_masks.py [--threads 1] [--repeats 30] [--quick] [--csv PATH]

The CIFAR ResNet-18 (``nepenthe.models.resnet18_cifar``, 11.2M parameters) with every Conv/Linear
weight ~50 % masked, once with bool mask buffers (``*_mask``, the default) and once packed
(``set_mask(..., packed=True)``: ``*_mask_bits``). Reported, in one run:

* mask bytes per masked weight and per parameter, summed over the model's real mask buffers
  (target for packed: <= 0.125);
* fused masked SGD (momentum 0.9, weight decay 5e-4) and AdamW steps (``masked_optimizer``, the
  loop's optimizer, masks looked up on the model at every step) on the CPU (``cpp`` backend), timed
  against each other in interleaved blocks (``nepenthe.benchmark.compare_providers``). Providers:
  ``packed_storage`` (the model stores bits; the step reads the buffers directly), ``bool_storage``
  (bool buffers read as bytes: ``pack_masks=False``) and ``bool_storage_cached_bits`` (bool buffers,
  the optimizer keeps packed copies: ``pack_masks=True``, the loop's default before packed storage).
  Ratios are each provider's median over ``bool_storage``'s, from the same run.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys

import torch

from nepenthe import ops
from nepenthe.benchmark import compare_providers, markdown_table, write_measurements
from nepenthe.loop import masked_optimizer
from nepenthe.masks import masked_parameters, pack_masks_, prunable_modules, set_mask
from nepenthe.models import resnet18_cifar


def masked_resnet18(packed: bool, seed: int = 0, width: int | None = None) -> torch.nn.Module:
    """The ResNet-18 with the same random masks (~50 % of every Conv/Linear weight) and gradients."""
    torch.manual_seed(seed)
    model = resnet18_cifar(num_classes=10) if width is None else resnet18_cifar(num_classes=10, width=width)
    g = torch.Generator().manual_seed(seed + 1)
    for module in prunable_modules(model).values():
        set_mask(module, torch.rand(module.weight.shape, generator=g) >= 0.5)
    if packed:
        pack_masks_(model)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    return model


def mask_bytes(model: torch.nn.Module) -> dict[str, float]:
    """Bytes of the model's mask buffers per masked weight and per parameter."""
    stored = sum(m.numel() * m.element_size() for _, _, m in masked_parameters(model))
    masked = sum(getattr(mod, name).numel() for mod, name, _ in masked_parameters(model))
    params = sum(p.numel() for p in model.parameters())
    return {"mask_bytes": stored, "masked_weights": masked, "parameters": params,
            "bytes_per_masked_weight": stored / masked, "bytes_per_parameter": stored / params}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="a narrow ResNet-18 and few repeats (a smoke run)")
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    width = 8 if args.quick else None
    repeats = 3 if args.quick else args.repeats
    print(f"device: {cpu_name()} ({args.threads} thread(s)); torch {torch.__version__}; python "
          f"{platform.python_version()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")

    rows, ok = [], True
    memory = {form: mask_bytes(masked_resnet18(form == "packed", width=width)) for form in ("bool", "packed")}
    print("\n#### mask memory (ResNet-18 CIFAR, every Conv/Linear weight masked)\n")
    print("| storage | mask bytes | bytes / masked weight | bytes / parameter |\n|---|---|---|---|")
    for form, m in memory.items():
        print(f"| {form} | {m['mask_bytes']:,} | {m['bytes_per_masked_weight']:.4f} | {m['bytes_per_parameter']:.4f} |")
    ratio = memory["packed"]["mask_bytes"] / memory["bool"]["mask_bytes"]
    target = memory["packed"]["bytes_per_masked_weight"] <= 0.125
    print(f"\npacked / bool mask bytes: {ratio:.4f}; packed <= 0.125 byte per masked weight: "
          f"{'met' if target else 'MISSED'} ({memory['packed']['bytes_per_masked_weight']:.6f})")
    ok &= target

    settings = {"sgd": dict(lr=0.01, momentum=0.9, weight_decay=5e-4), "adamw": dict(lr=1e-3, weight_decay=1e-2)}
    for name, kwargs in settings.items():
        packed, plain, cached = (masked_resnet18(p, width=width) for p in (True, False, False))
        providers = {
            "bool_storage": masked_optimizer(plain, name, pack_masks=False, **kwargs).step,
            "packed_storage": masked_optimizer(packed, name, **kwargs).step,
            "bool_storage_cached_bits": masked_optimizer(cached, name, pack_masks=True, **kwargs).step,
        }
        case = f"masked {name} step ResNet-18 fp32 (cpp)"
        with ops.use_backend("cpp"):
            got = compare_providers(case, providers, suite="packed_masks", repeats=repeats, warmup=3,
                                    threads=args.threads, reference="bool_storage")
        rows += got
        print(f"\n#### {case}\n\n{markdown_table(got)}")
    print("\n#### ratios (same run; time / bool_storage)\n")
    for r in rows:
        if r.get("relative") is not None:
            print(f"- {r['case']}: {r['provider']} {r['relative']:.3f}")
    if args.csv:
        for form, m in memory.items():
            rows.append({"suite": "packed_masks", "case": "mask bytes per masked weight", "provider": form,
                         "bytes": m["mask_bytes"], "relative": m["mask_bytes"] / memory["bool"]["mask_bytes"],
                         "device": "cpu", "threads": args.threads})
        print(f"\nwrote {write_measurements(rows, args.csv)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
