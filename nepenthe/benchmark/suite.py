"""The suite runner: fold each scenario at each batch size and time it against the unfolded model,
eager and ``torch.compile`` (see :mod:`nepenthe.benchmark`)."""

from __future__ import annotations

import inspect
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from .._utils import first_tensor
from ..environment import environment
from ..fold import count_flops, fold
from ..fold.preview import linearized
from ..latency import compare_latency
from .results import (
    CSV_COLUMNS,
    _progress_line,
    format_table,
    write_results,
)
from .scenarios import (
    SCENARIOS,
    BuiltScenario,
    Scenario,
    fold_arguments,
    get_scenario,
)

__all__ = ["DEFAULT_BATCHES", "MODES", "fold_scenario", "main_bench", "run_suite"]

MODES = ("eager", "compile")


DEFAULT_BATCHES = (1, 8, 32, 128, 256)

# one CSV row per scenario x batch x mode; the JSON rows hold these plus samples and the fold report


@torch.no_grad()
def _rel_error(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """max|a(x) - b(x)| / max|b(x)|."""
    ya, yb = first_tensor(a(x)).double(), first_tensor(b(x)).double()
    return float((ya - yb).abs().max() / yb.abs().max().clamp_min(1e-30))


def fold_scenario(built: BuiltScenario) -> tuple[nn.Module, float]:
    """``fold`` of a built scenario (its forced states are not those of ``example_input``, so fold's
    own check against the unfolded model is skipped: compare with ``linearized`` instead). The
    latency planner plans for ``example_input``'s batch (the batch the suite then times)."""
    kwargs = {**fold_arguments({"verify": False, "latency_input": built.example_input}), **built.fold_kwargs}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        folded = fold(built.model, built.stats, built.example_input, **kwargs)
    return folded.eval(), time.perf_counter() - start


def _compile_pair(before: nn.Module, after: nn.Module, x: torch.Tensor):
    """Both models compiled for this input's shape (static); first-call times; or the error."""
    torch._dynamo.reset()  # fresh caches: each batch size compiles once, statically
    compiled, seconds = [], []
    for m in (before, after):
        c = torch.compile(m, dynamic=False)
        start = time.perf_counter()
        with torch.no_grad():
            c(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        seconds.append(time.perf_counter() - start)
        compiled.append(c)
    return compiled, seconds


def _error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _row_base(scenario: Scenario, batch: int, mode: str, device: torch.device, threads: int) -> dict:
    return {c: None for c in CSV_COLUMNS} | {"scenario": scenario.name, "batch": batch, "mode": mode,
                                              "device": str(device), "threads": threads}


def run_suite(scenarios: Iterable[str | Scenario] = tuple(SCENARIOS), batches: Sequence[int] = DEFAULT_BATCHES,
              modes: Sequence[str] = MODES, device: torch.device | str = "cpu", threads: int | None = None,
              repeats: int = 10, warmup: int = 2, planner: str | None = None, fold_batch: int | None = None,
              progress: Callable[[str], None] | None = None) -> dict:
    """Time each scenario before and after folding at each batch size and mode.

    The model is folded once per batch size, so that fold's latency planner (where it exists)
    decides on that batch; ``fold_batch`` folds once per scenario on a batch of that size instead
    (much cheaper for large batches). ``threads`` fixes the CPU intra-op threads for the whole run
    (default: torch's current count); ``planner`` overrides the scenarios' planner. FLOPs are
    counted on one sample and multiplied by the batch size (the models are per-sample); exactness
    against the linearized model is checked on up to 8 samples. Returns ``{"environment",
    "config", "scenarios", "rows"}``; a row whose fold, compile or timing failed holds the error
    instead of times. ``progress`` gets one line per row.
    """
    scenarios = [get_scenario(s) for s in scenarios]
    batches = [int(b) for b in batches]
    if not scenarios:
        raise ValueError("no scenarios to run")
    if not batches or min(batches) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batches}")
    bad_modes = [m for m in modes if m not in MODES]
    if bad_modes or not modes:
        raise ValueError(f"modes must be some of {MODES}, got {list(modes)}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if fold_batch is not None and fold_batch < 1:
        raise ValueError(f"fold_batch must be >= 1, got {fold_batch}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    previous_threads = torch.get_num_threads()
    threads = threads or previous_threads
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    say = progress or (lambda line: None)
    result = {"environment": environment(device, threads),
              "config": {"batches": batches, "modes": list(modes), "repeats": repeats, "warmup": warmup,
                         "planner": planner, "fold_batch": fold_batch,
                         "fold_accepts": sorted(inspect.signature(fold).parameters)},
              "scenarios": {}, "rows": []}
    torch.set_num_threads(threads)  # also what torch.compile's CPU kernels are built for
    try:
        for scenario in scenarios:
            result["scenarios"][scenario.name] = {
                "description": scenario.description, "input_shape": list(scenario.input_shape),
                "states": dict(scenario.states), "empty": list(scenario.empty),
                "expected_removed": scenario.expected_removed}
            model = scenario.model(device)
            stats = scenario.stats(model)
            overrides = {"planner": planner} if planner else {}
            kwargs = fold_arguments({**scenario.fold_kwargs, **overrides, "threads": threads})
            result["scenarios"][scenario.name]["fold_kwargs"] = {k: v for k, v in kwargs.items()}
            reference = linearized(model, stats, approximate=bool(kwargs.get("approximate", False)))
            once = _fold_once(scenario, model, stats, kwargs, fold_batch, device) if fold_batch else None
            for batch in batches:
                for row in _run_batch(scenario, model, stats, reference, kwargs, batch, modes, device, threads,
                                      repeats, warmup, once):
                    row["fold_batch"] = fold_batch or batch
                    result["rows"].append(row)
                    say(_progress_line(row))
    finally:
        torch.set_num_threads(previous_threads)
        torch._dynamo.reset()
    return result


def _fold_once(scenario, model, stats, kwargs, batch, device):
    try:
        return fold_scenario(BuiltScenario(model, stats, scenario.example_input(batch, device), kwargs))
    except Exception as exc:  # noqa: BLE001 - recorded in the rows, the suite goes on
        return exc


def _run_batch(scenario, model, stats, reference, kwargs, batch, modes, device, threads, repeats, warmup, once=None):
    x = scenario.example_input(batch, device)
    folded = once if once is not None else _fold_once(scenario, model, stats, kwargs, batch, device)
    if isinstance(folded, Exception):
        for mode in modes:
            yield _row_base(scenario, batch, mode, device, threads) | {"error": f"fold: {_error_line(folded)}"}
        return
    folded, fold_s = folded
    report = getattr(folded, "fold_report", None)
    rep = report.to_dict() if report is not None else {}
    returned = rep.get("returned")
    common = {
        "flops_before": count_flops(model, x[:1]) * batch, "flops_after": count_flops(folded, x[:1]) * batch,
        "params_before": sum(p.numel() for p in model.parameters()),
        "params_after": sum(p.numel() for p in folded.parameters()),
        "rectifier_layers_removed": rep.get("rectifier_layers_removed"), "ops_merged": rep.get("ops_merged"),
        "critical_path_before": rep.get("critical_path_before"), "critical_path_after": rep.get("critical_path_after"),
        "returned": returned or "folded", "fold_s": fold_s, "planner_s": rep.get("planner", {}).get("seconds"),
        # exactness against the linearized model (what the forced statistics say the model computes);
        # a planner that handed back the original model has nothing to compare
        "max_rel_error": None if returned == "original" else _rel_error(folded, reference, x[:8]),
    }
    common["flops_ratio"] = common["flops_after"] / common["flops_before"] if common["flops_before"] else None
    for mode in modes:
        row = _row_base(scenario, batch, mode, device, threads) | common
        row["fold_report"] = rep
        try:
            if mode == "compile":
                (a, b), (row["compile_before_s"], row["compile_after_s"]) = _compile_pair(model, folded, x)
            else:
                a, b = model, folded
            before, after = compare_latency(a, b, x, warmup=warmup, repeats=repeats, threads=threads, device=device)
        except Exception as exc:  # noqa: BLE001 - e.g. torch.compile unavailable here: record it, go on
            row["error"] = f"{mode}: {_error_line(exc)}"
            yield row
            continue
        finally:
            if mode == "compile":
                torch._dynamo.reset()
        for tag, r in (("before", before), ("after", after)):
            row[f"{tag}_ms"], row[f"{tag}_iqr_ms"] = r.median_ms, r.iqr_ms
            row[f"{tag}_min_ms"], row[f"{tag}_max_ms"] = r.min_ms, r.max_ms
            row[f"{tag}_samples_ms"] = r.samples_ms
            row[f"{tag}_noisy"], row[f"{tag}_noise"] = r.noisy, r.noise
        row["noisy"] = before.noisy or after.noisy  # a speed-up from an unreliable median says so
        row["noise"] = "; ".join(f"{tag}: {r.noise}" for tag, r in (("before", before), ("after", after)) if r.noisy)
        row["repeats"], row["number"] = before.repeats, before.number
        row["speedup"] = before.median_ms / after.median_ms
        row["time_ratio"] = after.median_ms / before.median_ms
        yield row


def main_bench(scenarios: Sequence[str], batches: Sequence[int], modes: Sequence[str], device: str,
               threads: int | None, repeats: int, warmup: int, out: str, planner: str | None = None,
               fold_batch: int | None = None) -> dict:
    """What ``nepenthe bench`` does: run, print the table, write the files."""
    result = run_suite(scenarios, batches=batches, modes=modes, device=device, threads=threads, repeats=repeats,
                       warmup=warmup, planner=planner, fold_batch=fold_batch,
                       progress=lambda line: print(line, flush=True))
    print()
    print(format_table(result))
    paths = write_results(result, out)
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stdout)
    return result
