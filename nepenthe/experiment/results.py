"""Results of an experiment: per-method mean ± std over seeds, written as JSON, CSV, Markdown and plots.

``results.md`` is the table a paper would print (one row per method plus the dense model);
``results.csv`` has one row per (seed, method) run; ``accuracy_vs_removed.png`` puts every run
on test accuracy vs rectifier layers removed; ``entropy.png`` shows each method's layer
entropies over its iterations (first seed).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

from ..checkpoint import atomic_write_json, atomic_write_text
from ..report import entropy_heatmap, new_figure, save_figure

__all__ = ["METRICS", "markdown_table", "plot_accuracy_vs_removed", "plot_entropy_per_method", "runs_csv",
           "summarize", "write_results"]

# (key in a run's row, column title, format) of the quantities averaged over seeds
METRICS = [
    ("folded_test", "top-1 %", "{:.2f}"),
    ("delta_test", "Δ top-1", "{:+.2f}"),
    ("sparsity", "sparsity", "{:.3f}"),
    ("removed", "Rem.", "{:.1f}"),
    ("zero_entropy_layers", "H=0", "{:.1f}"),
    ("critical_path_after", "crit. path", "{:.1f}"),
    ("prune_seconds", "prune s", "{:.0f}"),
    ("fold_seconds", "fold s", "{:.1f}"),
    ("backoffs", "back-offs", "{:.1f}"),
]


def _mean_std(values: list[float]) -> dict:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _speedups(row: dict) -> dict[str, float | None]:
    return {b: v["speedup"] for b, v in row["latency"].items()}


def summarize(rows: list[dict], cfg) -> dict:
    """Per method: mean/std over seeds of every metric, speed-ups per deployment batch, and the
    dense model's own numbers. Rows may come in any order."""
    for row in rows:
        row["delta_test"] = row["folded_test"] - row["dense_test"]
    methods = [m for m in cfg.methods if any(r["method"] == m for r in rows)]
    summary: dict = {"dense": {}, "methods": {}}
    if rows:
        dense_by_seed = {r["seed"]: r for r in rows}
        summary["dense"] = {
            "test": _mean_std([r["dense_test"] for r in dense_by_seed.values()]),
            "rectifiers": rows[0]["rectifiers_before"],
            "critical_path": rows[0]["critical_path_before"],
            "latency_ms": {b: _mean_std([r["latency"][b]["before_ms"] for r in dense_by_seed.values()])
                           for b in rows[0]["latency"]},
        }
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        entry = {key: _mean_std([r[key] for r in mine]) for key, _, _ in METRICS}
        entry["pruned_test"] = _mean_std([r["pruned_test"] for r in mine])
        entry["speedup"] = {b: _mean_std([_speedups(r)[b] for r in mine]) for b in mine[0]["latency"]}
        entry["latency_ms"] = {b: _mean_std([r["latency"][b]["after_ms"] for r in mine]) for b in mine[0]["latency"]}
        entry["fold_share_of_prune"] = _mean_std([r["fold_seconds"] / r["prune_seconds"] for r in mine
                                                  if r["prune_seconds"] > 0])
        entry["within_1pt"] = sum(r["delta_test"] >= -1.0 for r in mine)
        entry["seeds"] = sorted(r["seed"] for r in mine)
        summary["methods"][method] = entry
    return summary


def _cell(stat: dict, fmt: str) -> str:
    if stat["mean"] is None:
        return "–"
    spread = " ± " + fmt.replace("+", "").format(stat["std"]) if stat["n"] > 1 else ""
    return fmt.format(stat["mean"]) + spread


def markdown_table(results: dict) -> str:
    summary = results["summary"]
    batches = list(summary["dense"].get("latency_ms", {}))
    head = (["method"] + [title for _, title, _ in METRICS] + [f"ms b{b}" for b in batches]
            + [f"speed-up b{b}" for b in batches])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dense = summary["dense"]
    if dense:
        cells = ["dense", _cell(dense["test"], "{:.2f}"), "", "0", f"0/{dense['rectifiers']}", "",
                 str(dense["critical_path"]), "", "", ""] + [_cell(dense["latency_ms"][b], "{:.3f}") for b in batches]
        cells += ["1.00"] * len(batches)
        lines.append("| " + " | ".join(cells) + " |")
    for method, entry in summary["methods"].items():
        cells = [method] + [_cell(entry[key], fmt) for key, _, fmt in METRICS]
        cells += [_cell(entry["latency_ms"][b], "{:.3f}") for b in batches]
        cells += [_cell(entry["speedup"][b], "{:.2f}") for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    n = max((e["removed"]["n"] for e in summary["methods"].values()), default=0)
    lines.append("")
    lines.append(f"Mean ± std over {n} seed(s). top-1: test accuracy of the returned (folded) model; Δ: vs the "
                 "dense model of the same seed; sparsity: masked share of all Conv/Linear weights; Rem.: rectifier "
                 f"layers removed (of {dense.get('rectifiers', '?')}); H=0: zero-entropy layers of the kept iteration; "
                 "crit. path: longest op chain of the returned model; ms: median latency (dense row: the dense "
                 "model; method rows: the returned model) at that batch size; speed-up: dense / returned latency, "
                 "timed interleaved in the same run.")
    return "\n".join(lines)


def runs_csv(rows: list[dict]) -> str:
    flat_keys = ["seed", "method", "dense_test", "pruned_test", "folded_test", "delta_test", "dense_val", "pruned_val",
                 "sparsity", "prunable_sparsity", "zero_entropy_layers", "rectifiers_before", "removed",
                 "critical_path_before", "critical_path_after", "selected_iteration", "backoffs", "retrainings",
                 "prune_seconds", "fold_seconds", "stop_reason"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    batches = list(rows[0]["latency"]) if rows else []
    writer.writerow(flat_keys + [f"{k}_b{b}" for b in batches for k in ("before_ms", "after_ms", "speedup")])
    for row in rows:
        writer.writerow([row.get(k) for k in flat_keys]
                        + [row["latency"][b][k] for b in batches for k in ("before_ms", "after_ms", "speedup")])
    return buffer.getvalue()


def plot_accuracy_vs_removed(results: dict, path: Path, delta: float | None) -> Path | None:
    fig = new_figure(figsize=(7, 4.5))
    if fig is None:
        return None
    ax = fig.subplots()
    summary, runs = results["summary"], results["runs"]
    for i, (method, entry) in enumerate(summary["methods"].items()):
        color = f"C{i}"
        mine = [r for r in runs if r["method"] == method]
        jitter = (i - (len(summary["methods"]) - 1) / 2) * 0.06
        ax.scatter([r["removed"] + jitter for r in mine], [r["folded_test"] for r in mine], color=color, alpha=0.35,
                   s=18)
        ax.errorbar(entry["removed"]["mean"] + jitter, entry["folded_test"]["mean"],
                    xerr=entry["removed"]["std"], yerr=entry["folded_test"]["std"], fmt="o", color=color, ms=8,
                    capsize=3, label=method)
    dense = summary["dense"]["test"]["mean"]
    if dense is not None:
        ax.axhline(dense, color="k", lw=1, label="dense")
        if delta is not None:
            ax.axhline(dense - delta, color="k", lw=1, ls="--", label=f"dense − {delta:g} pt")
    ax.set_xlabel(f"rectifier layers removed (of {summary['dense'].get('rectifiers', '?')})")
    ax.set_ylabel("test top-1 %")
    ax.set_title(f"{results['name']}: accuracy vs depth removed (dots: seeds; markers: mean ± std)", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_entropy_per_method(results: dict, path: Path) -> Path | None:
    runs = results["runs"]
    if not runs:
        return None
    first_seed = min(r["seed"] for r in runs)
    mine = [r for r in runs if r["seed"] == first_seed and r["iterations"] and r["iterations"][0]["layer_entropy"]]
    if not mine:
        return None
    layers = len(mine[0]["iterations"][0]["layer_entropy"])
    fig = new_figure(figsize=(4.2 * len(mine), max(3.0, 0.26 * layers + 1.6)))
    if fig is None:
        return None
    axes = fig.subplots(1, len(mine), squeeze=False)[0]
    for ax, run in zip(axes, mine):
        entropy_heatmap(ax, run["iterations"], title=f"{run['method']} (seed {first_seed})")
    fig.suptitle(f"{results['name']}: layer entropy (bits) per iteration; 0 = linearizable", fontsize=10)
    return save_figure(fig, path)


def write_results(out: Path, results: dict, cfg) -> None:
    """results.json, results.csv, results.md and the two plots."""
    atomic_write_json(json.loads(json.dumps(results, default=str)), out / "results.json")
    atomic_write_text(runs_csv(results["runs"]), out / "results.csv")
    delta = cfg.prune.get("delta", 1.0)
    table = markdown_table(results)
    atomic_write_text(f"# {results['name']}\n\n{table}\n", out / "results.md")
    plot_accuracy_vs_removed(results, out / "accuracy_vs_removed.png", delta)
    plot_entropy_per_method(results, out / "entropy.png")
