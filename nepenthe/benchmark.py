"""Latency benchmark suite: the paper's models before and after folding (SPEC §5, issue 4).

Each :class:`Scenario` builds, without training and deterministically (seeded), a model in the
state pruning would leave it in: chosen rectifier call sites declared linear by forced statistics
(:func:`nepenthe.fold.preview.forced_stats`), optionally whole convolutions emptied
(:func:`~nepenthe.fold.preview.empty_layers`). :func:`run_suite` folds it at each batch size and
times the model against the folded one, eager and ``torch.compile``, timing blocks interleaved
(:func:`nepenthe.compare_latency`: ``torch.utils.benchmark`` with fixed threads on CPU, CUDA events on
GPU), and records median / IQR / min / max, FLOPs, parameters, the fold report and the environment.
:func:`write_results` writes ``bench.json`` (everything), ``bench.csv`` (one row per scenario ×
batch × mode) and ``bench.png`` (speed-up bars; needs matplotlib). ``nepenthe bench`` is the CLI.

    from nepenthe.benchmark import SCENARIOS, run_suite, write_results
    result = run_suite(["resnet18", "mlp_block"], batches=(1, 32), modes=("eager",), threads=2)
    write_results(result, "bench-out")
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .entropy import EntropyStats
from .environment import environment
from .fold import count_flops, fold
from .fold.preview import empty_layers, forced_stats, linearized
from .latency import compare_latency
from .models import mobilenet_v2_cifar, resnet18_cifar, vgg16_bn_cifar

__all__ = [
    "CSV_COLUMNS", "MODES", "SCENARIOS", "BuiltScenario", "MLPBlock", "Scenario", "available_scenarios",
    "check_targets", "environment", "format_table", "get_scenario", "run_suite", "write_results",
]

MODES = ("eager", "compile")
DEFAULT_BATCHES = (1, 8, 32, 128, 256)

# one CSV row per scenario x batch x mode; the JSON rows hold these plus samples and the fold report
CSV_COLUMNS = [
    "scenario", "batch", "mode", "device", "threads",
    "before_ms", "before_iqr_ms", "before_min_ms", "before_max_ms",
    "after_ms", "after_iqr_ms", "after_min_ms", "after_max_ms",
    "speedup", "time_ratio", "flops_before", "flops_after", "flops_ratio", "params_before", "params_after",
    "rectifier_layers_removed", "ops_merged", "critical_path_before", "critical_path_after", "returned",
    "max_rel_error", "fold_batch", "fold_s", "planner_s", "compile_before_s", "compile_after_s", "repeats", "number",
    "error",
]


class MLPBlock(nn.Module):
    """A transformer MLP block on tokens: ``fc2(act(fc1(x)))`` with GELU, ``[batch, tokens, dim]``."""

    def __init__(self, dim: int = 384, hidden: int = 1536):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@dataclass
class BuiltScenario:
    """What a scenario gives at one batch size: the model, its statistics, an input, fold's kwargs."""

    model: nn.Module
    stats: EntropyStats
    example_input: torch.Tensor
    fold_kwargs: dict


@dataclass(frozen=True)
class Scenario:
    """A pruned model without training: ``states`` forced on call sites, ``empty`` convs zeroed.

    ``fold_kwargs`` go to :func:`nepenthe.fold` (``planner`` only where fold has it);
    ``expected_removed`` is the number of rectifier layers folding must remove.
    """

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one sample, without the batch dimension
    states: Mapping[str, str]
    expected_removed: int
    empty: tuple[str, ...] = ()
    fold_kwargs: Mapping[str, object] = field(default_factory=dict)
    seed: int = 0

    def model(self, device: torch.device | str = "cpu") -> nn.Module:
        """The model in eval mode: seeded init, BatchNorm given non-trivial statistics, ``empty`` zeroed."""
        torch.manual_seed(self.seed)
        model = self.make_model()
        _randomize_batchnorm(model, torch.Generator().manual_seed(self.seed + 1))
        empty_layers(model, self.empty)
        return model.to(device).eval()

    def example_input(self, batch: int, device: torch.device | str = "cpu", seed: int | None = None) -> torch.Tensor:
        if batch < 1:
            raise ValueError(f"batch sizes must be >= 1, got {batch}")
        gen = torch.Generator().manual_seed(self.seed + 2 if seed is None else seed)
        return torch.randn((batch, *self.input_shape), generator=gen).to(device)

    def stats(self, model: nn.Module) -> EntropyStats:
        """Forced statistics: ``states`` on the named call sites, every other call site mixed."""
        device = next(model.parameters()).device
        return forced_stats(model, self.example_input(2, device, seed=self.seed + 3), dict(self.states))

    def build(self, batch: int, device: torch.device | str = "cpu", **fold_overrides) -> BuiltScenario:
        model = self.model(device)
        return BuiltScenario(model, self.stats(model), self.example_input(batch, device),
                             fold_arguments({**self.fold_kwargs, **fold_overrides}))


def fold_arguments(kwargs: Mapping[str, object]) -> dict:
    """``kwargs`` without those this version of :func:`nepenthe.fold` does not take (e.g. ``planner``)."""
    accepted = inspect.signature(fold).parameters
    return {k: v for k, v in kwargs.items() if k in accepted}


@torch.no_grad()
def _randomize_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    # a freshly built BN is the identity; trained ones are not, and folding must fuse them exactly
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.track_running_stats:
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
            m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)


_RESNET_EMPTY_BLOCKS = ("layer1.1", "layer2.1", "layer3.1", "layer4.1")
# residual inverted-residual blocks (stride 1, same channels): the last one of each repeated group
_MOBILENET_LINEAR_BLOCKS = ("features.3", "features.6", "features.10", "features.13", "features.16")
# every other ReLU of VGG-16-bn's stages 3-5 (call sites are the ReLU modules' paths)
_VGG_LINEAR_SITES = ("features.19", "features.26", "features.32", "features.39")

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "resnet18",
            "CIFAR ResNet-18, conv1+conv2 of the second block of each stage emptied, their relu1 linear",
            resnet18_cifar, (3, 32, 32),
            states={f"{b}.relu1": "on" for b in _RESNET_EMPTY_BLOCKS}, expected_removed=4,
            empty=tuple(f"{b}.conv{i}" for b in _RESNET_EMPTY_BLOCKS for i in (1, 2)),
            fold_kwargs={"planner": "latency"}),
        Scenario(
            "mobilenet_v2",
            "CIFAR MobileNetV2, both ReLU6 of 5 residual inverted-residual blocks linear",
            mobilenet_v2_cifar, (3, 32, 32),
            states={f"{b}.{part}.act": "on" for b in _MOBILENET_LINEAR_BLOCKS for part in ("expand", "depthwise")},
            expected_removed=2 * len(_MOBILENET_LINEAR_BLOCKS), fold_kwargs={"planner": "latency"}),
        Scenario(
            "vgg16_bn",
            "CIFAR VGG-16-bn, every other ReLU of stages 3-5 linear",
            vgg16_bn_cifar, (3, 32, 32),
            states={s: "on" for s in _VGG_LINEAR_SITES}, expected_removed=len(_VGG_LINEAR_SITES),
            fold_kwargs={"planner": "latency"}),
        Scenario(
            "mlp_block",
            "transformer MLP block Linear(384,1536)-GELU-Linear(1536,384) on 64 tokens, GELU linear (approximate)",
            MLPBlock, (64, 384),
            states={"act": "on"}, expected_removed=1, fold_kwargs={"approximate": True, "planner": "latency"}),
    )
}


def available_scenarios() -> tuple[str, ...]:
    return tuple(SCENARIOS)


def get_scenario(name: str | Scenario) -> Scenario:
    if isinstance(name, Scenario):
        return name
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    return SCENARIOS[name]


# ----- measuring ----------------------------------------------------------------------------------
def _first_tensor(out) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


@torch.no_grad()
def _rel_error(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """max|a(x) - b(x)| / max|b(x)|."""
    ya, yb = _first_tensor(a(x)).double(), _first_tensor(b(x)).double()
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
        row["repeats"], row["number"] = before.repeats, before.number
        row["speedup"] = before.median_ms / after.median_ms
        row["time_ratio"] = after.median_ms / before.median_ms
        yield row


# ----- targets, reports ---------------------------------------------------------------------------
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
            f"speed-up {row['speedup']:5.2f}x  FLOPs ratio {_fmt(row['flops_ratio'], '.3f')}")


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
                     f"{r['after_ms']:.3f} ({r['after_iqr_ms']:.3f})", f"{r['speedup']:.2f}x",
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


def write_results(result: Mapping, out: str | os.PathLike, plot: bool = True,
                  say: Callable[[str], None] = print) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.csv`` and (matplotlib permitting) ``bench.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "csv": out / "bench.csv"}
    payload = dict(result) | {"targets": check_targets(result)}
    paths["json"].write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["rows"])
    if plot:
        png = out / "bench.png"
        if plot_speedups(result, png, say=say):
            paths["png"] = png
    return paths


def plot_speedups(result: Mapping, path: str | os.PathLike, say: Callable[[str], None] = print) -> bool:
    """Bars of the speed-up (unfolded / folded median) per batch size, one panel per scenario, one
    bar per mode. Returns False (and says so in one line) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("bench.png skipped: matplotlib is not installed (pip install 'nepenthe[plot]')")
        return False
    rows = [r for r in result["rows"] if not r.get("error")]
    names = list(dict.fromkeys(r["scenario"] for r in result["rows"]))
    modes = list(dict.fromkeys(r["mode"] for r in result["rows"]))
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(3.6 * max(1, len(names)), 3.4), squeeze=False)
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
    plt.close(fig)
    return True


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
