"""The fold planner: which exact merges to make (docs/method.md §4.5), in bounded time and reproducibly.

Merging is exact but not always faster: two 3×3 convs become one 5×5 (more FLOPs), a depthwise conv
merged with a pointwise one becomes a dense conv. Dropping activations, fusing BatchNorm, deleting
constant channels and collapsing constant additions never add work, so they are not planned.

Modes: ``"latency"`` (the default of ``fold``), ``"all"`` (every exact merge: the shallowest graph,
what the exactness tests use), ``"none"`` (drop activations only, no merges).

How ``"latency"`` decides a merge candidate, cheapest evidence first:

1. **FLOPs** (counted on one sample of the tensor that reaches the candidate): merged FLOPs ≤
   unmerged FLOPs → merge (fewer ops and no more arithmetic); merged ≥ ``flops_limit`` × unmerged
   → do not merge. No timing.
2. **Cache**: candidates with the same signature (op types and shapes, merged op, input shape,
   dtype, device, threads: e.g. the repeated blocks of a ResNet stage) are timed once.
3. **Timing**, only for candidates whose FLOP change is in doubt: merged and unmerged are timed in
   paired rounds (the two blocks of a round back to back, order alternating), and after each
   round from ``min_rounds`` on a confidence interval of the ratio merged/unmerged is computed
   (mean ± t·s/√n of the log ratios, the round farthest from the median left out from 4 rounds
   on, so that one burst of load elsewhere does not decide). Timing stops as soon as the interval
   settles the question, at the latest after ``repeats`` rounds. The candidate is merged only when
   the whole interval lies below ``1 − margin`` and every round but one measured it faster
   ("clearly faster", after at least ``min_rounds`` = 5 rounds); otherwise — a dead band — the
   FLOP rule decides (the FLOPs went up: no merge). So a ratio near 1 cannot flip the decision
   from one run to the next.
4. **Budget**: timing stops when ``budget_s`` seconds of planner time are spent (a round is not
   started if it would overrun); every candidate still undecided then takes the FLOP rule.

The whole-model check of ``fold`` (is the folded model faster than the original?) uses the same
paired rounds, interval and budget (from ``model_min_rounds`` = 3 rounds on: each is two forwards
of the model), see ``nepenthe.fold.fold``.

Timing is injectable: ``Planner(timer=...)`` takes ``timer(fn, number) -> seconds per call`` (one
block of ``number`` calls of the zero-argument ``fn``), and ``clock`` the time source of the
budget; tests use both to make decisions deterministic and the budget observable.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from ..latency import CudaEventTimer

__all__ = ["DEFAULT_BUDGET_S", "PLANNER_MODES", "BenchTimer", "Candidate", "Comparison", "log_interval",
           "paired_ratio", "Planner"]

PLANNER_MODES = ("latency", "all", "none")
DEFAULT_BUDGET_S = 3.0

# one-sided 95 % quantiles of Student's t, by degrees of freedom (beyond: 1.645)
_T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812,
        11: 1.796, 12: 1.782, 13: 1.771, 14: 1.761, 15: 1.753, 16: 1.746, 17: 1.740, 18: 1.734, 19: 1.729,
        20: 1.725, 25: 1.708, 30: 1.697}


def _t95(df: int) -> float:
    if df in _T95:
        return _T95[df]
    below = [d for d in _T95 if d <= df]
    return _T95[max(below)] if df <= 30 else 1.645


@dataclass
class Candidate:
    """One possible exact merge in the graph."""

    key: str  # e.g. "layer1.0.conv1 + layer1.0.conv2", stable while neither op changes
    input_node: fx.Node  # the tensor both computations read
    unmerged: Callable[[torch.Tensor], torch.Tensor]  # what the graph computes now
    build: Callable[[], nn.Module]  # the merged op (built only when considered)
    apply: Callable[[nn.Module], None]  # rewrite the graph to use it
    corrected: bool = False  # the merged op needs a border correction (tried after the plain merges)
    ops: tuple = ()  # the modules the unmerged computation calls (for the timing cache's signature)
    kind: str = ""  # "chain", "skip" or "branches"
    # longer chains around a chain candidate: (key, input node, unmerged fn, build merged or None)
    groups: Callable[[], Iterable[tuple[str, fx.Node, Callable, Callable[[], nn.Module | None]]]] | None = None


@dataclass
class Comparison:
    """Paired timing of ``new`` against ``old``: ratio = new / old per round."""

    verdict: str  # "faster" / "slower" (the interval clears the dead band), "tie", or "unmeasured"
    ratio: float | None = None  # geometric mean of the paired ratios
    low: float | None = None  # the ratio's confidence interval
    high: float | None = None
    rounds: int = 0
    old_ms: float | None = None  # median ms per call
    new_ms: float | None = None
    seconds: float = 0.0  # wall time of the comparison, warm-up included
    stopped: str = ""  # "settled", "max_rounds", "budget"

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("verdict", "ratio", "low", "high", "rounds", "old_ms", "new_ms",
                                              "seconds", "stopped")}


class BenchTimer:
    """The default timer: a block of ``number`` calls timed with ``time.perf_counter`` and the
    intra-op threads fixed on the CPU, with CUDA events on a GPU (``nepenthe.latency``).
    (``torch.utils.benchmark.Timer.timeit`` runs two warm-up calls before every block: tripling
    the cost of blocks of one call of a large model, which the budget pays for.)"""

    def __init__(self, threads: int, device: torch.device):
        self.threads, self.device = threads, device
        self._cuda: dict[int, tuple[Callable, CudaEventTimer]] = {}

    def __call__(self, fn: Callable[[], object], number: int) -> float:
        if self.device.type == "cuda":
            entry = self._cuda.get(id(fn))
            if entry is None or entry[0] is not fn:
                entry = self._cuda[id(fn)] = (fn, CudaEventTimer(fn, self.device, self.threads, no_grad=False))
            return entry[1].timeit(number).mean
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            start = time.perf_counter()
            for _ in range(number):
                fn()
            return (time.perf_counter() - start) / number
        finally:
            torch.set_num_threads(before)


def log_interval(ratios: list[float]) -> tuple[float, float, float]:
    """(geometric mean, low, high) of paired ratios: mean ± t₀.₉₅·s/√n of their logs, the round
    farthest from the median left out when there are 4 or more (one burst of load elsewhere)."""
    logs = [math.log(max(r, 1e-12)) for r in ratios]
    if len(logs) >= 4:
        mid = statistics.median(logs)
        logs.remove(max(logs, key=lambda v: abs(v - mid)))
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), 0.0, math.inf
    half = _t95(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


@dataclass
class Planner:
    """Decides the merges of ``fold`` (see the module docstring). Reusable across folds: ``fold``
    calls :meth:`start`, which resets the decisions, counters and budget but keeps the cache."""

    mode: str = "latency"
    budget_s: float | None = DEFAULT_BUDGET_S  # planner seconds (timing and its FLOP counts); None: no limit
    margin: float = 0.05  # dead band: "faster" needs the interval below 1 − margin, "slower" above 1 + margin
    flops_limit: float = 1.5  # merged / unmerged FLOPs from which a merge is refused without timing
    repeats: int = 9  # at most this many paired rounds per comparison
    min_rounds: int = 5  # paired rounds before a merge candidate can be declared faster
    model_min_rounds: int = 3  # the same for the whole-model check (each round: two forwards of the model)
    warmup: int = 2  # calls of each side before timing
    block_s: float = 0.01  # target seconds per timing block (calls per block chosen from the warm-up)
    threads: int | None = None
    timer: Callable[[Callable[[], object], int], float] | None = None  # (fn, number) -> s per call
    clock: Callable[[], float] = time.perf_counter
    cache: dict = field(default_factory=dict)
    decisions: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    spent_s: float = 0.0  # planner seconds used in the current fold
    budget_exhausted: bool = False  # the budget cut some timing short in the current fold

    def __post_init__(self):
        if self.mode not in PLANNER_MODES:
            raise ValueError(f"planner must be one of {PLANNER_MODES}, got {self.mode!r}")
        if self.budget_s is not None and self.budget_s < 0:
            raise ValueError(f"budget_s must be >= 0 or None, got {self.budget_s}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {self.margin}")
        if min(self.min_rounds, self.model_min_rounds) < 2 or self.repeats < max(self.min_rounds,
                                                                                 self.model_min_rounds):
            raise ValueError(f"need 2 <= min_rounds, model_min_rounds <= repeats, got {self.min_rounds}, "
                             f"{self.model_min_rounds}, {self.repeats}")
        self.start()

    @property
    def merges(self) -> bool:
        return self.mode != "none"

    def start(self) -> None:
        """Begin a fold: no decisions yet, the whole budget available (the cache is kept)."""
        self.decisions = []
        self.counts = {"flops": 0, "timing": 0, "cache": 0, "budget": 0, "no_shape": 0}
        self.spent_s = 0.0
        self.budget_exhausted = False

    def remaining_s(self) -> float:
        return math.inf if self.budget_s is None else self.budget_s - self.spent_s

    def summary(self) -> dict:
        """What the planner did in this fold, for ``FoldReport.planner``."""
        return {"mode": self.mode, "seconds": self.spent_s, "budget_s": self.budget_s,
                "budget_used_s": self.spent_s, "budget_exhausted": self.budget_exhausted,
                "margin": self.margin, "flops_limit": self.flops_limit,
                "decided_by_flops": self.counts["flops"], "decided_by_timing": self.counts["timing"],
                "decided_from_cache": self.counts["cache"], "decided_by_budget": self.counts["budget"],
                "no_shape": self.counts["no_shape"], "decisions": list(self.decisions)}

    # ----- comparisons -------------------------------------------------------------------------
    def compare(self, old: Callable[[], object], new: Callable[[], object], device: torch.device,
                want: str = "both", min_rounds: int | None = None) -> Comparison:
        """Time ``new`` against ``old`` in paired rounds until the interval of new/old settles
        ``want`` ("faster": is new clearly faster?; "slower": is it clearly slower?; "both"),
        ``repeats`` rounds are done, or the budget would be overrun (a round, or the ``min_rounds``
        needed for any verdict, is not started when it would not fit). Counts against the budget."""
        start = self.clock()
        result = Comparison("unmeasured", stopped="budget")
        try:
            result = self._compare(old, new, device, want, start, min_rounds or self.min_rounds)
        finally:
            result.seconds = self.clock() - start
            self.spent_s += result.seconds
            if result.stopped == "budget":
                self.budget_exhausted = True
        return result

    def _left(self, start: float) -> float:
        return self.remaining_s() - (self.clock() - start)

    def _compare(self, old, new, device, want: str, start: float, min_rounds: int) -> Comparison:
        if self._left(start) <= 0:
            return Comparison("unmeasured", stopped="budget")
        timer = self.timer or BenchTimer(self.threads or torch.get_num_threads(), torch.device(device))
        t0 = self.clock()
        t_old, t_new = timer(old, 1), timer(new, 1)  # first calls: warm-up and cost estimate
        first_s = self.clock() - t0  # what one call of each costs the budget, overheads included
        if self.warmup > 1 and (self.warmup - 1) * first_s < self._left(start):
            t_old, t_new = timer(old, self.warmup - 1), timer(new, self.warmup - 1)
        number = max(1, min(10_000, int(self.block_s / max(t_old, t_new, 1e-7))))
        round_s = max(number * (t_old + t_new), first_s)  # estimate until a round has been measured
        if min_rounds * round_s > self._left(start):
            return Comparison("unmeasured", stopped="budget")
        ratios, olds, news = [], [], []
        stopped = "max_rounds"
        for i in range(self.repeats):
            if round_s > self._left(start):
                stopped = "budget"
                break
            t0 = self.clock()
            if i % 2:  # alternate which side runs first (it inherits the other's cache state)
                b, a = timer(new, number), timer(old, number)
            else:
                a, b = timer(old, number), timer(new, number)
            round_s = self.clock() - t0
            olds.append(a)
            news.append(b)
            ratios.append(b / a if a > 0 else 1.0)
            if len(ratios) >= min_rounds and _settled(ratios, self.margin, want):
                stopped = "settled"
                break
        if len(ratios) < min_rounds:
            return Comparison("unmeasured", rounds=len(ratios), stopped=stopped)
        ratio, low, high = log_interval(ratios)
        verdict = _verdict(ratios, self.margin)
        return Comparison(verdict, ratio, low, high, len(ratios), statistics.median(olds) * 1e3,
                          statistics.median(news) * 1e3, stopped=stopped)

    # ----- merge candidates ----------------------------------------------------------------------
    @torch.no_grad()
    def accept(self, candidate: Candidate, merged: nn.Module) -> bool:
        if self.mode == "all":
            return True
        if self.mode == "none":
            return False
        start, spent = self.clock(), self.spent_s
        try:
            return self._decide(candidate, merged)
        finally:  # FLOP counting and timing: the planner's own cost
            self.spent_s = spent + (self.clock() - start)

    def _favourable_group(self, candidate: Candidate) -> tuple[str, float] | None:
        if candidate.groups is None:
            return None
        try:
            return _group_flops(candidate.groups())
        except Exception:  # noqa: BLE001 - looking ahead is an optimisation: never let it break a fold
            return None

    def _record(self, candidate: Candidate, merged: bool, by: str, **info) -> bool:
        self.counts[by] += 1
        self.decisions.append({"candidate": candidate.key, "merged": merged, "by": by, **info})
        return merged

    def _decide(self, candidate: Candidate, merged: nn.Module) -> bool:
        x = _example_for(candidate.input_node, merged)
        if x is None:  # no shape known for this tensor: cannot measure, so do not risk a slower op
            return self._record(candidate, False, "no_shape", reason="no example tensor shape reaches this op")
        shape = list(x.shape)
        unmerged = candidate.unmerged
        flops_ratio = _flops_ratio(unmerged, merged, x[:1] if x.dim() > 1 and x.shape[0] > 1 else x)
        info = {"shape": shape, "flops_ratio": flops_ratio}
        if flops_ratio is not None and flops_ratio <= 1.0:
            return self._record(candidate, True, "flops", reason="no more FLOPs merged (and fewer ops)", **info)
        group = self._favourable_group(candidate)
        if group is not None:
            return self._record(candidate, True, "flops", reason=f"first step of merging the chain {group[0]}, which "
                                f"has fewer FLOPs merged ({group[1]:.3g}x)", group=group[0],
                                group_flops_ratio=group[1], **info)
        if flops_ratio is None or flops_ratio >= self.flops_limit:
            why = (f"merged FLOPs >= {self.flops_limit:g} x unmerged" if flops_ratio is not None
                   else "FLOPs not countable")
            return self._record(candidate, False, "flops", reason=why, **info)
        key = _signature(candidate, merged, x, self.threads or torch.get_num_threads())
        cached = self.cache.get(key)
        if cached is not None:
            return self._record(candidate, cached.verdict == "faster", "cache", **info, **_timing_info(cached))
        if self.remaining_s() <= 0:
            self.budget_exhausted = True
            return self._record(candidate, False, "budget",
                                reason="planner budget spent: FLOP rule (more FLOPs merged: no merge)", **info)
        comparison = self.compare(lambda: unmerged(x), lambda: merged(x), x.device, want="faster")
        if comparison.verdict == "unmeasured":
            return self._record(candidate, False, "budget",
                                reason="planner budget spent: FLOP rule (more FLOPs merged: no merge)", **info,
                                **_timing_info(comparison))
        self.cache[key] = comparison
        accepted = comparison.verdict == "faster"
        reason = ("measured clearly faster merged" if accepted else
                  "not clearly faster merged (dead band): FLOP rule, more FLOPs merged: no merge")
        return self._record(candidate, accepted, "timing", reason=reason, **info, **_timing_info(comparison))


def _group_flops(groups, max_builds: int = 3) -> tuple[str, float] | None:
    """The first chain around a candidate whose full merge has no more FLOPs than its ops."""
    built = 0
    for key, node, unmerged, build in groups:
        if built >= max_builds:
            break
        merged = build()
        built += 1
        if merged is None:
            continue
        x = _example_for(node, merged)
        if x is None:
            continue
        ratio = _flops_ratio(unmerged, merged, x[:1] if x.dim() > 1 and x.shape[0] > 1 else x)
        if ratio is not None and ratio <= 1.0:
            return key, ratio
    return None


def _verdict(ratios: list[float], margin: float) -> str:
    """"faster" when the interval lies below 1 − margin and every round but one measured new < old;
    "slower" symmetrically; else "tie"."""
    _, low, high = log_interval(ratios)
    if high < 1 - margin and sum(r >= 1 for r in ratios) <= 1:
        return "faster"
    if low > 1 + margin and sum(r <= 1 for r in ratios) <= 1:
        return "slower"
    return "tie"


def _settled(ratios: list[float], margin: float, want: str) -> bool:
    _, low, high = log_interval(ratios)
    verdict = _verdict(ratios, margin)
    faster, slower = verdict == "faster", verdict == "slower"
    if want == "faster":  # settled: clearly faster, or it can no longer be shown (interval above 1 − margin)
        return faster or low >= 1 - margin
    if want == "slower":
        return slower or high <= 1 + margin
    return faster or slower or (low >= 1 - margin and high <= 1 + margin)


def _timing_info(c: Comparison) -> dict:
    return {"verdict": c.verdict, "ratio": c.ratio, "low": c.low, "high": c.high, "rounds": c.rounds,
            "unmerged_ms": c.old_ms, "merged_ms": c.new_ms}


def _flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


def _flops_ratio(unmerged, merged: nn.Module, x: torch.Tensor) -> float | None:
    try:
        before, after = _flops(lambda: unmerged(x)), _flops(lambda: merged(x))
    except Exception:  # noqa: BLE001 - an op FlopCounterMode cannot run: decide without FLOPs
        return None
    if before <= 0:
        return None if after > 0 else 1.0
    return after / before


def _module_signature(m: nn.Module) -> tuple:
    tensors = tuple((name, tuple(t.shape), str(t.dtype))
                    for name, t in [*m.named_parameters(), *m.named_buffers()])
    extra = repr(m.recipe_kwargs()) if hasattr(m, "recipe_kwargs") else m.extra_repr()
    return type(m).__qualname__, extra, tensors


def _signature(candidate: Candidate, merged: nn.Module, x: torch.Tensor, threads: int) -> tuple:
    """What the timing of a candidate depends on: op kinds, shapes and settings (not weight values)."""
    layout = "channels_last" if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else "contiguous"
    return (candidate.kind, tuple(_module_signature(m) for m in candidate.ops), _module_signature(merged),
            tuple(x.shape), str(x.dtype), str(x.device), layout, threads)


def paired_ratio(before, after) -> float:
    """Median over rounds of after/before, each round's two blocks timed back to back: load from
    other processes hits both blocks of a round alike, so this is steadier than a ratio of medians."""
    ratios = sorted(b / a for a, b in zip(before.samples_ms, after.samples_ms) if a > 0)
    if not ratios:
        return after.median_ms / before.median_ms if before.median_ms > 0 else 1.0
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else 0.5 * (ratios[mid - 1] + ratios[mid])


def _example_for(node: fx.Node, module: nn.Module) -> torch.Tensor | None:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)  # the same tensor in every run
    x = torch.randn(tuple(meta.shape), generator=gen).to(dtype=meta.dtype, device=device)
    if getattr(meta, "memory_format", None) == torch.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
