"""The benchmark's results: target checks, the text / markdown table, and the files (bench.json,
bench.csv, measurements.csv, bench.png)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .compare import write_measurements

__all__ = ["CSV_COLUMNS", "check_targets", "format_table", "measurement_rows", "plot_speedups", "write_results"]

CSV_COLUMNS = [
    "scenario", "batch", "mode", "device", "threads",
    "before_ms", "before_iqr_ms", "before_min_ms", "before_max_ms",
    "after_ms", "after_iqr_ms", "after_min_ms", "after_max_ms",
    "speedup", "time_ratio", "flops_before", "flops_after", "flops_ratio", "params_before", "params_after",
    "rectifier_layers_removed", "ops_merged", "critical_path_before", "critical_path_after", "returned",
    "max_rel_error", "fold_batch", "fold_s", "planner_s", "compile_before_s", "compile_after_s", "repeats", "number",
    "error", "noisy", "noise",
]


def check_targets(result: Mapping) -> list[dict]:
    """The issue's targets, for each row they apply to.

    * ``resnet18`` at batch 32 on CPU: folded median ≤ 1.15 × (FLOPs after / FLOPs before) × unfolded;
    * ``mlp_block``: folded median ≤ 0.5 × the block's.

    A row where fold's planner handed back the original model gets a ``note``: its FLOPs ratio is
    1, so the first bound holds trivially and says nothing about folding.
    """
    checks = []
    for row in result["rows"]:
        if row.get("error") or row.get("time_ratio") is None:
            continue
        check = None
        if row["scenario"] == "resnet18" and row["batch"] == 32 and row["device"] == "cpu":
            bound = 1.15 * row["flops_ratio"]
            check = {"target": "resnet18 batch 32 CPU: after/before <= 1.15 x FLOPs ratio", "mode": row["mode"],
                     "batch": 32, "measured": row["time_ratio"], "bound": bound, "met": row["time_ratio"] <= bound}
        if row["scenario"] == "mlp_block":
            check = {"target": "mlp_block: after/before <= 0.5", "mode": row["mode"], "batch": row["batch"],
                     "measured": row["time_ratio"], "bound": 0.5, "met": row["time_ratio"] <= 0.5}
        if check is not None:
            if row.get("returned") == "original":
                check["note"] = "fold returned the original model (its planner measured every fold slower)"
            checks.append(check)
    return checks


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _progress_line(row: Mapping) -> str:
    head = f"{row['scenario']:<13} batch {row['batch']:>4} {row['mode']:<7}"
    if row.get("error"):
        return f"{head} error: {row['error']}"
    return (f"{head} before {row['before_ms']:9.3f} ms  after {row['after_ms']:9.3f} ms  "
            f"speed-up {row['speedup']:5.2f}x  FLOPs ratio {_fmt(row['flops_ratio'], '.3f')}"
            + (f"  NOISY ({row['noise']})" if row.get("noisy") else ""))


def format_table(result: Mapping, markdown: bool = False) -> str:
    """The rows as a table (plain text, or Markdown for RESULTS.md), then the targets."""
    head = ["scenario", "batch", "mode", "before ms (IQR)", "after ms (IQR)", "speed-up", "FLOPs ratio",
            "removed", "fold gave", "compile s (before/after)"]
    lines = []
    for r in result["rows"]:
        if r.get("error"):
            error = r["error"].replace("|", "/") if markdown else r["error"]
            cells = [r["scenario"], str(r["batch"]), r["mode"], "error", error, "", "", "", "", ""]
        else:
            comp = (f"{r['compile_before_s']:.1f} / {r['compile_after_s']:.1f}"
                    if r.get("compile_before_s") is not None else "")
            cells = [r["scenario"], str(r["batch"]), r["mode"], f"{r['before_ms']:.3f} ({r['before_iqr_ms']:.3f})",
                     f"{r['after_ms']:.3f} ({r['after_iqr_ms']:.3f})",
                     f"{r['speedup']:.2f}x" + (" (noisy)" if r.get("noisy") else ""),
                     _fmt(r["flops_ratio"], ".3f"), _fmt(r["rectifier_layers_removed"], "d"), r["returned"] or "",
                     comp]
        lines.append(cells)
    checks = check_targets(result)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c) + " |" for c in lines]
        if checks:
            out += ["", "| target | mode | batch | measured after/before | bound | |", "|---|---|---|---|---|---|"]
            out += [f"| {c['target']} | {c['mode']} | {c['batch']} | {c['measured']:.3f} | {c['bound']:.3f} | "
                    f"{'met' if c['met'] else 'NOT met'}{' (' + c['note'] + ')' if c.get('note') else ''} |"
                    for c in checks]
        return "\n".join(out)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in lines]
    for c in checks:
        out.append(f"target {c['target']} [{c['mode']}, batch {c['batch']}]: {c['measured']:.3f} vs "
                   f"{c['bound']:.3f} -> {'met' if c['met'] else 'NOT met'}"
                   + (f" ({c['note']})" if c.get("note") else ""))
    return "\n".join(out)


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (torch.device, torch.dtype, Path)):
        return str(obj)
    return repr(obj)


def measurement_rows(result: Mapping) -> list[dict]:
    """The suite's timings in the measurement schema (:data:`~nepenthe.benchmark.MEASUREMENT_COLUMNS`):
    per scenario × batch × mode, one row for the model and one for its folded form (``relative`` =
    its median over the model's)."""
    rows = []
    for r in result["rows"]:
        case = f"{r['scenario']} batch {r['batch']} {r['mode']}"
        common = {"suite": "latency", "case": case, "device": r.get("device"), "threads": r.get("threads"),
                  "repeats": r.get("repeats"), "number": r.get("number"), "scenario": r["scenario"],
                  "batch": r["batch"], "mode": r["mode"]}
        if r.get("error") or r.get("before_ms") is None:
            rows.append({**common, "provider": "*", "error": r.get("error") or "not timed"})
            continue
        for provider, key in (("model", "before"), ("folded", "after")):
            ms = r.get(f"{key}_ms")
            rows.append({**common, "provider": provider, "median_ms": ms, "iqr_ms": r.get(f"{key}_iqr_ms"),
                         "min_ms": r.get(f"{key}_min_ms"), "relative": ms / r["before_ms"] if ms is not None else None,
                         "noisy": r.get(f"{key}_noisy"), "noise": r.get(f"{key}_noise")})
    return rows


def write_results(result: Mapping, out: str | os.PathLike, plot: bool = True,
                  say: Callable[[str], None] = print) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.csv`` (one row per scenario × batch × mode, before and after side
    by side), ``measurements.csv`` (the same timings in the measurement schema every benchmark of the
    project writes) and (matplotlib permitting) ``bench.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "csv": out / "bench.csv", "measurements": out / "measurements.csv"}
    payload = dict(result) | {"targets": check_targets(result)}
    paths["json"].write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["rows"])
    write_measurements(measurement_rows(result), paths["measurements"], ["scenario", "batch", "mode"])
    if plot:
        png = out / "bench.png"
        if plot_speedups(result, png, say=say):
            paths["png"] = png
    return paths


def plot_speedups(result: Mapping, path: str | os.PathLike, say: Callable[[str], None] = print) -> bool:
    """Bars of the speed-up (unfolded / folded median) per batch size, one panel per scenario, one
    bar per mode. Returns False (and says so in one line) when matplotlib is not installed."""
    try:  # a Figure on an Agg canvas, without pyplot: the user's backend and open figures are left alone
        import matplotlib  # noqa: F401  (first: its absence must not hide behind cached submodules)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        say("bench.png skipped: matplotlib is not installed (pip install 'nepenthe[plot]')")
        return False
    rows = [r for r in result["rows"] if not r.get("error")]
    names = list(dict.fromkeys(r["scenario"] for r in result["rows"]))
    modes = list(dict.fromkeys(r["mode"] for r in result["rows"]))
    fig = Figure(figsize=(3.6 * max(1, len(names)), 3.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(names)), squeeze=False)
    width = 0.8 / max(1, len(modes))
    for ax, name in zip(axes[0], names):
        batches = sorted({r["batch"] for r in result["rows"] if r["scenario"] == name})
        for k, mode in enumerate(modes):
            by_batch = {r["batch"]: r["speedup"] for r in rows if r["scenario"] == name and r["mode"] == mode}
            xs = [i + (k - (len(modes) - 1) / 2) * width for i in range(len(batches))]
            ax.bar(xs, [by_batch.get(b, 0.0) for b in batches], width, label=mode)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(batches)), [str(b) for b in batches])
        ax.set_xlabel("batch")
        ax.set_title(name)
    axes[0][0].set_ylabel("speed-up (unfolded / folded)")
    axes[0][0].legend(loc="lower center", fontsize=8, framealpha=0.9)
    env = result.get("environment", {})
    fig.suptitle(f"{env.get('device_name', '')}, threads: {env.get('threads', '')}, torch {env.get('torch', '')}, "
                 f"{env.get('date', '')[:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True
