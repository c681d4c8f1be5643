"""What fold's latency planner costs and decides, and what the folded models gain (the numbers in RESULTS.md).

    .venv/bin/python bench/compare_fold.py [--part planner,mlp] [--threads 1] [--batch 32] [--runs 3]
                                           [--repeats 10] [--json bench/compare_fold.json] [--csv fold.csv]

``--json`` keeps everything (planner decisions, fold seconds); ``--csv`` writes the model / folded
timings in the package's measurement schema (``nepenthe.benchmark.write_measurements``).

``planner``: each benchmark scenario (``nepenthe.benchmark``: CIFAR ResNet-18 with emptied blocks,
MobileNetV2 and VGG-16-bn with linear rectifiers, a transformer MLP block) at one batch: fold seconds
with ``planner="all"`` and with ``planner="latency"`` (latency input = that batch, default budget),
``--runs`` times, to show the decisions are the same each time; the planner's own seconds and how
its candidates were decided; then each folded model timed against the model (interleaved blocks,
``nepenthe.compare_latency``), and the FLOPs ratio.

``mlp``: the residual MLP of the main job (``ResidualMLP(64, 10)``, 8 blocks) with 0, 4 or 8 blocks
emptied by pruning (fc1 weights all zero), measured on random data, folded with the latency planner
at deployment batch 1 and 256: critical path, fold seconds and speed-up at that batch.
"""

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

import nepenthe
from nepenthe import benchmark as nb
from nepenthe.fold import count_flops
from nepenthe.latency import LatencyResult

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fold_latency import collapsed_mlp  # noqa: E402

MEASUREMENTS: list[dict] = []  # model / folded timings of both parts, for --csv


def record(case: str, before: LatencyResult, after: LatencyResult, **extra) -> None:
    MEASUREMENTS.extend(nb.rows_from_results(case, {"model": before, "folded": after}, suite="fold",
                                             reference="model", **extra))


def timed_fold(model, stats, x, **kwargs):
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        folded = nepenthe.fold(model, stats, x, **kwargs)
    return folded, time.perf_counter() - start


def planner_part(args) -> list[dict]:
    rows = []
    for name in args.scenarios.split(","):
        scenario = nb.get_scenario(name)
        model = scenario.model()
        stats = scenario.stats(model)
        x = scenario.example_input(args.batch)
        kwargs = {**scenario.fold_kwargs, "verify": False, "threads": args.threads}
        all_folded, all_s = timed_fold(model, stats, x, **{**kwargs, "planner": "all"})
        runs = []
        for _ in range(args.runs):
            folded, seconds = timed_fold(model, stats, x, **{**kwargs, "planner": "latency", "latency_input": x})
            r = folded.fold_report
            runs.append({"fold_s": seconds, "planner_s": r.planner["seconds"], "returned": r.returned,
                         "merges": list(r.merges), "critical_path": [r.critical_path_before, r.critical_path_after],
                         "decisions": [(d["candidate"], d["merged"], d["by"]) for d in r.planner["decisions"]],
                         "counts": {k: r.planner[k] for k in ("decided_by_flops", "decided_by_timing",
                                                               "decided_from_cache", "decided_by_budget")},
                         "budget_exhausted": r.planner["budget_exhausted"],
                         "whole_model": [(c["model"], c["verdict"], c["ratio"], c["rounds"])
                                         for c in r.planner["whole_model"]],
                         "reason": r.returned_reason})
        same = all([d[:2] for d in run["decisions"]] == [d[:2] for d in runs[0]["decisions"]]
                   and run["returned"] == runs[0]["returned"] for run in runs)
        flops = count_flops(model, x[:1])
        row = {"scenario": name, "batch": args.batch, "threads": args.threads, "all_fold_s": all_s,
               "all_merges": len(all_folded.fold_report.merges),
               "all_critical_path": all_folded.fold_report.critical_path_after, "runs": runs,
               "same_decisions_every_run": same}
        for tag, m in (("latency", folded), ("all", all_folded)):
            before, after = nepenthe.compare_latency(model, m, x, repeats=args.repeats, warmup=1, threads=args.threads)
            record(f"{name} batch {args.batch} planner={tag}", before, after)
            row[f"{tag}_time_ratio"] = after.median_ms / before.median_ms
            row[f"{tag}_ms"] = [before.median_ms, after.median_ms, before.iqr_ms, after.iqr_ms]
            row[f"{tag}_flops_ratio"] = count_flops(m, x[:1]) / flops
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
        for run in runs:
            print("   ", json.dumps({k: v for k, v in run.items() if k != "decisions"}), flush=True)
    print("\n| scenario | fold s, all | fold s, latency (runs) | planner s | merges latency / all | decided by "
          "FLOPs / timing / cache / budget | same decisions | returned | after/before, latency fold (all) | "
          "FLOPs ratio latency (all) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        runs = r["runs"]
        c = runs[0]["counts"]
        fold_s = ", ".join(format(u["fold_s"], ".2f") for u in runs)
        planner_s = ", ".join(format(u["planner_s"], ".2f") for u in runs)
        print(f"| {r['scenario']} | {r['all_fold_s']:.2f} | {fold_s} | "
              f"{planner_s} | {len(runs[0]['merges'])} / {r['all_merges']} | "
              f"{c['decided_by_flops']} / {c['decided_by_timing']} / {c['decided_from_cache']} / "
              f"{c['decided_by_budget']} | {'yes' if r['same_decisions_every_run'] else 'NO'} | "
              f"{runs[0]['returned']} | {r['latency_time_ratio']:.3f} ({r['all_time_ratio']:.3f}) | "
              f"{r['latency_flops_ratio']:.3f} ({r['all_flops_ratio']:.3f}) |")
    return rows


def mlp_part(args) -> list[dict]:
    rows = []
    for collapsed in (0, 4, 8):
        model = collapsed_mlp(collapsed)
        calib = torch.randn(512, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        stats = nepenthe.measure(model, [calib])
        for batch in (1, 256):
            x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(2))
            folded, seconds = timed_fold(model, stats, calib, latency_input=x, threads=args.threads)
            r = folded.fold_report
            before, after = nepenthe.compare_latency(model, folded, x, repeats=args.repeats, threads=args.threads)
            record(f"residual MLP {collapsed}/8 blocks emptied, batch {batch}", before, after)
            rows.append(dict(collapsed_blocks=collapsed, batch=batch, fold_s=seconds, planner_s=r.planner["seconds"],
                             returned=r.returned, before_ms=before.median_ms, before_iqr_ms=before.iqr_ms,
                             after_ms=after.median_ms, after_iqr_ms=after.iqr_ms,
                             speedup=before.median_ms / after.median_ms,
                             critical_path=f"{r.critical_path_before}->{r.critical_path_after}"))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| collapsed blocks | deployment batch | fold s (planner s) | returned | pruned ms (IQR) | "
          "folded ms (IQR) | speed-up | critical path |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['collapsed_blocks']}/8 | {r['batch']} | {r['fold_s']:.2f} ({r['planner_s']:.2f}) | "
              f"{r['returned']} | "
              f"{r['before_ms']:.3f} ({r['before_iqr_ms']:.3f}) | {r['after_ms']:.3f} ({r['after_iqr_ms']:.3f}) | "
              f"{r['speedup']:.2f}x | {r['critical_path']} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", default="planner,mlp")
    parser.add_argument("--scenarios", default="resnet18,mobilenet_v2,vgg16_bn,mlp_block")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None)
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = {"environment": nb.environment("cpu", args.threads), "args": vars(args)}
    parts = args.part.split(",")
    if "planner" in parts:
        out["planner"] = planner_part(args)
    if "mlp" in parts:
        out["mlp"] = mlp_part(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    if args.csv:
        nb.write_measurements(MEASUREMENTS, args.csv)


if __name__ == "__main__":
    main()
