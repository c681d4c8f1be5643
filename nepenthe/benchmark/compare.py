"""Provider comparisons: several ways of doing one thing (a fused op and PyTorch's fastest way, a
model and its folded form) timed against each other in one run, recorded as rows of one schema.

Every measurement file the project writes uses :data:`MEASUREMENT_COLUMNS` (one row per case ×
provider): ``bench/compare_*.py --csv``, the GPU suite's ``results.csv`` and the latency suite's
``measurements.csv`` beside its ``bench.csv`` report. A script defines its cases (a name and a
builder returning ``{provider: zero-argument callable}``) and calls :func:`compare_providers`;
:func:`markdown_table` prints them and :func:`write_measurements` writes them.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from ..latency import LatencyResult, compare_calls

__all__ = ["MEASUREMENT_COLUMNS", "NOISE_COLUMNS", "compare_providers", "markdown_table", "read_measurements",
           "rows_from_results", "write_measurements"]

MEASUREMENT_COLUMNS = [
    "suite", "case", "provider", "median_ms", "iqr_ms", "min_ms", "relative", "bytes", "gb_per_s", "device",
    "threads", "repeats", "number", "error",
]
# written after MEASUREMENT_COLUMNS, optional when read (files written before they existed lack them):
# whether a provider's blocks spread too widely to trust its median (nepenthe.latency), and how
NOISE_COLUMNS = ["noisy", "noise"]


def _reference_name(names: Iterable[str], reference: str | None) -> str | None:
    names = list(names)
    if reference is not None:
        return reference if reference in names else None
    return next((n for n in names if n.startswith("nepenthe")), names[0] if names else None)


def rows_from_results(case: str, results: Mapping[str, LatencyResult], *, suite: str = "",
                      reference: str | None = None, nbytes: int | None = None, **extra) -> list[dict]:
    """Rows of :data:`MEASUREMENT_COLUMNS` (plus ``extra`` columns) for timed providers.

    ``relative`` is each provider's median over the reference's (``reference``, else the first
    provider whose name starts with ``nepenthe``, else the first); ``gb_per_s`` is ``nbytes`` over
    the median when the case moves a known number of bytes.
    """
    ref = _reference_name(results, reference)
    ref_ms = results[ref].median_ms if ref is not None else None
    rows = []
    for provider, r in results.items():
        rows.append({
            "suite": suite, "case": case, "provider": provider, "median_ms": r.median_ms, "iqr_ms": r.iqr_ms,
            "min_ms": r.min_ms, "relative": r.median_ms / ref_ms if ref_ms else None, "bytes": nbytes,
            "gb_per_s": nbytes / (r.median_ms * 1e-3) / 1e9 if nbytes and r.median_ms else None,
            "device": r.device, "threads": r.threads, "repeats": r.repeats, "number": r.number, "error": None,
            "noisy": r.noisy, "noise": r.noise, **extra})
    return rows


def compare_providers(case: str, providers: Mapping[str, Callable[[], object]], *, suite: str = "",
                      repeats: int = 15, warmup: int = 5, threads: int | None = None, device="cpu",
                      reference: str | None = None, nbytes: int | None = None, **extra) -> list[dict]:
    """Time ``providers`` against each other (:func:`nepenthe.latency.compare_calls`: interleaved
    blocks, the order rotating each round) and return their rows. A failure of the timing (a
    provider raised) gives one row with provider ``"*"`` and the error, so a long run goes on."""
    try:
        results = compare_calls(providers, repeats=repeats, warmup=warmup, threads=threads, device=device)
    except Exception as exc:  # noqa: BLE001 - recorded in the row; the caller's run goes on
        lines = str(exc).strip().splitlines()
        error = f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]
        return [{**dict.fromkeys(MEASUREMENT_COLUMNS), "suite": suite, "case": case, "provider": "*", "bytes": nbytes,
                 "device": str(device), "threads": threads, "error": error, **extra}]
    return rows_from_results(case, results, suite=suite, reference=reference, nbytes=nbytes, **extra)


def markdown_table(rows: list[dict]) -> str:
    """One case's rows as the markdown table the scripts print (ms, IQR, relative, GB/s when known)."""
    rate = any(r.get("gb_per_s") for r in rows)
    out = ["| provider | median ms (IQR) | time / reference |" + (" GB/s |" if rate else ""),
           "|---|---|---|" + ("---|" if rate else "")]
    for r in rows:
        if r.get("error"):
            out.append(f"| {r['provider']} | error: {r['error']} | - |" + (" - |" if rate else ""))
            continue
        noisy = " noisy" if r.get("noisy") else ""
        cells = f"| {r['provider']} | {r['median_ms']:.3f} ({r['iqr_ms']:.3f}){noisy} | {r['relative']:.2f} |"
        out.append(cells + (f" {r['gb_per_s']:.1f} |" if rate and r.get("gb_per_s") else (" - |" if rate else "")))
    return "\n".join(out)


def write_measurements(rows: list[dict], path: str | os.PathLike, extra_columns: Iterable[str] = ()) -> Path:
    """Write ``rows`` as CSV with :data:`MEASUREMENT_COLUMNS`, :data:`NOISE_COLUMNS`, then ``extra_columns``
    (other keys are left out), atomically (a temporary file renamed over ``path``)."""
    path = Path(path)
    columns = MEASUREMENT_COLUMNS + NOISE_COLUMNS
    columns += [c for c in extra_columns if c not in columns]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    os.replace(tmp, path)
    return path


def read_measurements(path: str | os.PathLike) -> list[dict]:
    """The rows of a measurement CSV, numbers as floats / ints and empty cells as None."""
    def value(column: str, text: str):
        if text == "":
            return None
        if column in ("threads", "repeats", "number", "bytes"):
            return int(float(text))
        if column in ("median_ms", "iqr_ms", "min_ms", "relative", "gb_per_s"):
            return float(text)
        if column == "noisy":
            return text == "True"
        return text
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MEASUREMENT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} is not a measurement file: it lacks the columns {missing}")
        return [{k: value(k, v) for k, v in row.items()} for row in reader]
