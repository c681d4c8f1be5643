"""The latency planner of ``nepenthe.fold`` (issue 10): bounded time, stable decisions, a report that
describes the returned model.

Timing is injected (``Planner(timer=..., clock=...)``) wherever a test asserts decisions: the fake
timers below charge each call from what it executes (aten ops and FLOPs, counted by dispatch modes),
optionally with seeded noise, and advance a fake clock, so the outcome does not depend on this
machine's load. One test uses real timing (``test_real_timing_gives_the_same_decisions``).
"""

from __future__ import annotations

import json
import math
import random
import time

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from nepenthe import fold, measure
from nepenthe.fold import critical_path
from nepenthe.fold.planner import Planner, log_interval
from nepenthe.fold.preview import empty_layers, forced_stats, linearized
from nepenthe.fold.report import count_linear_ops
from nepenthe.graph import find_sites, trace
from nepenthe.models import ResidualMLP

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # forced states are not those of the example input: fold's own check warns, as it should
              pytest.mark.filterwarnings("ignore:folded model differs from the original")]


# ----- fake timing ----------------------------------------------------------------------------------
class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in (torch.ops.aten.detach.default, torch.ops.aten.view.default, torch.ops.aten.t.default,
                        torch.ops.aten.expand.default, torch.ops.aten._unsafe_view.default):
            self.ops += 1
        return func(*args, **(kwargs or {}))


def cost_of(fn) -> tuple[int, int]:
    """(aten ops, FLOPs) of one call of ``fn``."""
    flops, ops = FlopCounterMode(display=False), _CountOps()
    with torch.no_grad(), flops, ops:
        fn()
    return ops.ops, flops.get_total_flops()


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CostTimer:
    """Seconds per call = (op_s per aten op + flop_s per FLOP) x seeded log-normal noise; advances
    ``clock`` by what it charged. ``kind(fn)`` may override the cost of whole-model calls."""

    def __init__(self, clock: FakeClock, op_s: float = 1e-5, flop_s: float = 1e-9, noise: float = 0.0,
                 seed: int = 0, kind=None):
        self.clock, self.op_s, self.flop_s, self.noise = clock, op_s, flop_s, noise
        self.rng = random.Random(seed)
        self.kind = kind
        self.calls = 0

    def __call__(self, fn, number: int) -> float:
        self.calls += 1
        ops, flops = cost_of(fn)
        seconds = self.op_s * ops + self.flop_s * flops
        if self.kind is not None:
            seconds = self.kind(fn, ops, seconds)
        seconds *= math.exp(self.rng.gauss(0.0, self.noise)) if self.noise else 1.0
        self.clock.now += seconds * number
        return seconds


def fake_planner(**kw) -> Planner:
    clock = FakeClock()
    timer_kw = {k: kw.pop(k) for k in ("op_s", "flop_s", "noise", "seed", "kind") if k in kw}
    return Planner("latency", timer=CostTimer(clock, **timer_kw), clock=clock, **kw)


# ----- models -----------------------------------------------------------------------------------------
class Pairs(nn.Module):
    """Linear(d→h) → ReLU → Linear(h→d') → ReLU per pair: the first ReLU of a pair is made linear,
    so each pair is one merge candidate; with h in (d/3, d/2) merging adds 1–1.5x the FLOPs."""

    def __init__(self, dims: list[tuple[int, int, int]]):
        super().__init__()
        self.pairs = nn.ModuleList(nn.ModuleDict({"a": nn.Linear(d, h), "act": nn.ReLU(), "b": nn.Linear(h, e),
                                                  "out": nn.ReLU()}) for d, h, e in dims)

    def forward(self, x):
        for p in self.pairs:
            x = p["out"](p["b"](p["act"](p["a"](x))))
        return x


def pair_states(model: Pairs) -> dict:
    return {f"pairs.{i}.act": "on" for i in range(len(model.pairs))}


SMALL = (24, 10, 24)  # merged 24x24 vs 2x(24x10): 1.2x the FLOPs; tiny: per-op overhead dominates
LARGE = (600, 210, 600)  # 1.43x the FLOPs, and the FLOPs dominate: merged is slower
UP, DOWN = (24, 200, 600), (600, 200, 24)  # width changes that merge into fewer FLOPs (no timing)


def decisions(report) -> list[tuple[str, bool]]:
    return [(d["candidate"], d["merged"]) for d in report.planner["decisions"]]


# ----- the statistics of the interval -------------------------------------------------------------------
def test_log_interval_ignores_one_burst_and_is_exact_without_noise():
    ratio, low, high = log_interval([0.5, 0.5, 0.5])
    assert ratio == pytest.approx(0.5) and low == pytest.approx(0.5) and high == pytest.approx(0.5)
    ratio, low, high = log_interval([0.5, 0.52, 0.48, 5.0])  # one round hit by load elsewhere
    assert high < 0.6
    ratio, low, high = log_interval([0.9, 1.1, 0.95])
    assert low < 1.0 < high


# ----- FLOPs first, timing only in doubt, cache -----------------------------------------------------------
def test_flop_rule_decides_clear_candidates_without_timing():
    model = Pairs([(24, 40, 24), (24, 4, 24)]).eval()  # 0.6x the FLOPs merged; 3x the FLOPs merged
    x = torch.randn(8, 24)
    plan = fake_planner()
    folded = fold(model, forced_stats(model, x, pair_states(model)), x, planner=plan, verify=False)
    report = folded.fold_report
    assert decisions(report) == [("pairs.0.a + pairs.0.b", True), ("pairs.1.a + pairs.1.b", False)]
    assert [d["by"] for d in report.planner["decisions"]] == ["flops", "flops"]
    assert report.planner["decided_by_flops"] == 2 and report.planner["decided_by_timing"] == 0
    assert report.planner["decisions"][0]["flops_ratio"] == pytest.approx(24 * 24 / (2 * 24 * 40))


def test_cache_times_repeated_identical_blocks_once():
    model = Pairs([SMALL] * 4).eval()
    x = torch.randn(8, 24)
    stats = forced_stats(model, x, pair_states(model))
    plan = fake_planner()
    report = fold(model, stats, x, planner=plan, verify=False).fold_report
    p = report.planner
    assert p["decided_by_timing"] == 1 and p["decided_from_cache"] == 3
    assert [d["by"] for d in p["decisions"]] == ["timing", "cache", "cache", "cache"]
    assert decisions(report) == [(f"pairs.{i}.a + pairs.{i}.b", True) for i in range(4)]  # overhead-bound: merged
    # the planner keeps its cache across the folds it plans: a second fold times no candidate
    again = fold(model, stats, x, planner=plan, verify=False).fold_report
    assert again.planner["decided_by_timing"] == 0 and again.planner["decided_from_cache"] == 4
    assert decisions(again) == decisions(report)


def test_a_costlier_first_merge_is_made_when_the_whole_chain_merges_into_fewer_flops():
    """expand (1x1) → depthwise 3x3 → project (1x1), both activations linear (MobileNetV2): depthwise∘
    project alone is a dense 3x3 (many more FLOPs), but the three ops merge into one 3x3 with fewer."""
    model = nn.Sequential(nn.Conv2d(8, 48, 1), nn.ReLU6(), nn.Conv2d(48, 48, 3, padding=1, groups=48), nn.ReLU6(),
                          nn.Conv2d(48, 8, 1)).eval()
    x = torch.randn(2, 8, 10, 10)
    stats = forced_stats(model, x, {"1": "on", "3": "on"})
    folded = fold(model, stats, x, planner=fake_planner(op_s=0.0), verify=False)  # FLOP-bound machine
    report = folded.fold_report
    assert report.returned == "folded" and report.ops_merged == 2 and report.linear_ops_after == 1
    first = report.planner["decisions"][0]
    assert first["merged"] and first["by"] == "flops" and first["flops_ratio"] > 1.5 and first["group_flops_ratio"] < 1
    fresh = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        ref = linearized(model, stats)(fresh)
        assert float((folded(fresh) - ref).abs().max() / ref.abs().max()) <= 1e-5


# ----- determinism ------------------------------------------------------------------------------------------
def test_decisions_are_identical_under_timing_noise():
    """The same model folded 6 times with differently seeded noise (±15 % per timing block): the
    same decisions every time — the overhead-bound merge clearly faster, the FLOP-bound one in the dead
    band or clearly slower (both: not merged) — and the same returned model."""
    model = Pairs([SMALL, UP, LARGE, DOWN, (24, 12, 30)]).eval()
    x = torch.randn(4, 24)
    stats = forced_stats(model, x, pair_states(model))
    runs = []
    for seed in range(6):
        report = fold(model, stats, x, planner=fake_planner(noise=0.15, seed=seed), verify=False).fold_report
        runs.append((decisions(report), report.merges, report.returned))
        assert [d["by"] for d in report.planner["decisions"]] == ["timing", "flops", "timing", "flops", "timing"]
    assert all(run == runs[0] for run in runs)
    assert runs[0][0] == [(f"pairs.{i}.a + pairs.{i}.b", merged) for i, merged in enumerate(
        [True, True, False, True, True])]


def test_real_timing_gives_the_same_decisions():
    """Real timers (this machine, shared, 1 thread): a merge that halves the op count and one that adds
    43 % FLOPs to a FLOP-bound pair decide the same way in every fold."""
    model = Pairs([SMALL, UP, LARGE]).eval()
    x = torch.randn(4, 24)
    stats = forced_stats(model, x, pair_states(model))
    runs = []
    for _ in range(3):
        folded = fold(model, stats, x, latency_input=torch.randn(64, 24), threads=1, verify=False)
        runs.append(decisions(folded.fold_report))
        assert folded.fold_report.planner["seconds"] <= folded.fold_report.planner["budget_s"] + 0.5
    assert runs[0] == runs[1] == runs[2]
    assert runs[0][1:] == [("pairs.1.a + pairs.1.b", True), ("pairs.2.a + pairs.2.b", False)]


# ----- budget -----------------------------------------------------------------------------------------------
def test_budget_is_respected_with_a_slow_timer():
    """Every timing block sleeps 30 ms (a real, slow timer): fold returns within its budget (plus its own
    work), the candidates left when the budget is spent take the FLOP rule, the whole-model check too."""
    widths = [24 + 2 * i for i in range(9)]
    dims = [(d, round(d / 2.4), e) for d, e in zip(widths, widths[1:])]  # all ~1.2x FLOPs merged, no two alike
    model = Pairs(dims).eval()
    x = torch.randn(4, dims[0][0])
    stats = forced_stats(model, x, pair_states(model))

    def slow(fn, number):
        time.sleep(0.03)
        return 1e-3

    start = time.perf_counter()
    baseline = fold(model, stats, x, planner="all", verify=False)
    all_s = time.perf_counter() - start
    budget = 0.6
    start = time.perf_counter()
    folded = fold(model, stats, x, planner=Planner("latency", budget_s=budget, timer=slow), verify=False)
    wall = time.perf_counter() - start
    p = folded.fold_report.planner
    assert p["seconds"] <= budget + 0.15  # one warm-up pair may start just before the end
    # fold's own work in latency mode (the unmerged copy, shape propagation, FLOPs of two variants) is
    # about twice the planner='all' fold's; an unbounded planner would take seconds here (9 candidates,
    # 30 ms a timing block)
    assert wall <= budget + 2 * all_s + 1.0
    assert p["budget_exhausted"] and p["decided_by_budget"] >= 1
    by = [d["by"] for d in p["decisions"]]
    assert by[-1] == "budget" and by == sorted(by, key=lambda b: b == "budget")  # timing, then budget
    assert all(not d["merged"] for d in p["decisions"] if d["by"] == "budget")  # FLOP rule: more FLOPs, no merge
    assert p["decided_by_timing"] + p["decided_by_budget"] + p["decided_by_flops"] == len(dims)
    # the whole-model check had no time left: kept by the FLOP rule (the no-merge fold never adds work)
    assert p["whole_model"][-1]["verdict"] == "unmeasured"
    assert folded.fold_report.returned in ("folded", "folded_no_merges")
    assert folded.fold_report.rectifier_layers_removed == baseline.fold_report.rectifier_layers_removed


def test_zero_budget_decides_everything_from_flops():
    model = Pairs([SMALL, (24, 40, 24)]).eval()
    x = torch.randn(4, 24)
    plan = Planner("latency", budget_s=0.0, timer=lambda fn, n: pytest.fail("timed with no budget"))
    report = fold(model, forced_stats(model, x, pair_states(model)), x, planner=plan, verify=False).fold_report
    assert decisions(report) == [("pairs.0.a + pairs.0.b", False), ("pairs.1.a + pairs.1.b", True)]
    assert [d["by"] for d in report.planner["decisions"]] == ["budget", "flops"]
    assert report.returned == "folded"  # no more FLOPs than the original, check not timed: FLOP rule
    assert "budget" in report.returned_reason


# ----- the whole-model check and the report -------------------------------------------------------------------
def _whole_model_timer(model: nn.Module, costs: dict):
    """Candidates charged by ops and FLOPs; whole-model calls by ``costs``: "original" (a hook on the
    model's root tells), "merged" (the first folded graph timed: the one with the planner's merges)
    or "unmerged" (a folded graph with more ops). A hook on ``model.stem``, which every fold keeps
    (copied with its hooks), tells whole-model calls from candidates."""
    root, stem = [], []
    model.register_forward_pre_hook(lambda m, a: root.append(1))
    model.stem.register_forward_pre_hook(lambda m, a: stem.append(1))
    whole_ops: dict[str, int] = {}

    def kind(fn, ops, seconds):
        root.clear()
        stem.clear()
        fn()
        if root:
            return costs["original"]
        if not stem:  # a merge candidate
            return seconds
        whole_ops.setdefault("merged", ops)
        return costs["merged"] if ops <= whole_ops["merged"] else costs["unmerged"]

    return kind


def _check_report_matches(folded: nn.Module, report) -> None:
    gm = folded if isinstance(folded, torch.fx.GraphModule) else trace(folded, "checking")
    assert report.linear_ops_after == count_linear_ops(gm)
    assert report.critical_path_after == critical_path(gm)
    assert report.params_after == sum(p.numel() for p in folded.parameters())
    assert report.rectifier_layers_total - report.rectifier_layers_removed == len(find_sites(gm))
    assert report.returned_reason
    json.dumps(report.to_dict(), allow_nan=False)


def _residual_mlp():
    torch.manual_seed(0)
    model = ResidualMLP(6, num_classes=3, width=16, hidden=24, depth=3).eval()
    x = torch.randn(16, 6)
    return model, x, forced_stats(model, x, {f"blocks.{i}.relu": "on" for i in range(3)})


def test_original_returned_when_every_fold_is_slower():
    model, x, stats = _residual_mlp()
    kind = _whole_model_timer(model, {"original": 1e-3, "merged": 2e-3, "unmerged": 3e-3})
    folded = fold(model, stats, x, planner=fake_planner(kind=kind))
    report = folded.fold_report
    assert report.returned == "original" and isinstance(folded, ResidualMLP)
    assert report.rectifier_layers_removed == 0 and report.removed == [] and report.ops_merged == 0
    assert report.merges == [] and report.ops_deleted == [] and report.channels_removed == {}
    assert (report.linear_ops_after, report.critical_path_after, report.params_after, report.flops_after) == (
        report.linear_ops_before, report.critical_path_before, report.params_before, report.flops_before)
    assert report.max_rel_error == 0.0
    _check_report_matches(folded, report)
    # what the two discarded folds would have given, and why they were not returned
    merged, unmerged = report.discarded["folded"], report.discarded["folded_no_merges"]
    assert merged["rectifier_layers_removed"] == unmerged["rectifier_layers_removed"] == 3
    assert merged["ops_merged"] > 0 and unmerged["ops_merged"] == 0 and unmerged["merges"] == []
    assert merged["critical_path_after"] < unmerged["critical_path_after"] < report.critical_path_before
    assert "slower" in merged["reason"] and "slower" in unmerged["reason"]
    assert [c["model"] for c in report.planner["whole_model"]] == ["folded", "folded_no_merges"]
    assert [c["verdict"] for c in report.planner["whole_model"]] == ["slower", "slower"]


def test_fold_without_merges_returned_when_the_merged_one_is_slower():
    model, x, stats = _residual_mlp()
    kind = _whole_model_timer(model, {"original": 1e-3, "merged": 2e-3, "unmerged": 0.7e-3})
    folded = fold(model, stats, x, planner=fake_planner(kind=kind))
    report = folded.fold_report
    assert report.returned == "folded_no_merges"
    assert report.rectifier_layers_removed == 3 and report.ops_merged == 0 and report.merges == []
    with torch.no_grad():  # the error is the returned model's (forced states: not those of x, so not small)
        ref = model(x)
        assert report.max_rel_error == pytest.approx(float((folded(x) - ref).abs().max() / ref.abs().max()), rel=1e-3)
    _check_report_matches(folded, report)
    assert set(report.discarded) == {"folded"} and report.discarded["folded"]["ops_merged"] > 0
    assert "slower" in report.discarded["folded"]["reason"]
    with torch.no_grad():
        fresh = torch.randn(5, 6)
        ref = linearized(model, stats)(fresh)
        assert float((folded(fresh) - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_merged_fold_kept_when_the_check_is_a_tie_and_it_has_fewer_flops():
    model, x, stats = _residual_mlp()
    kind = _whole_model_timer(model, {"original": 1e-3, "merged": 1.01e-3, "unmerged": 1e-3})
    folded = fold(model, stats, x, planner=fake_planner(kind=kind))
    report = folded.fold_report
    assert report.returned == "folded" and report.ops_merged > 0 and report.discarded == {}
    assert report.planner["whole_model"][0]["verdict"] == "tie" and "FLOP rule" in report.returned_reason
    _check_report_matches(folded, report)


def test_report_is_json_and_counts_add_up():
    model, x, stats = _residual_mlp()
    report = fold(model, stats, x, planner=fake_planner()).fold_report
    p = report.planner
    assert (p["decided_by_flops"] + p["decided_by_timing"] + p["decided_from_cache"] + p["decided_by_budget"]
            + p["no_shape"]) == len(p["decisions"])
    assert p["seconds"] >= 0 and p["budget_used_s"] == p["seconds"] and report.seconds > 0
    assert p["latency_input_shape"] == [[1, 6]]  # default: the first sample of example_input
    json.dumps(report.to_dict(), allow_nan=False)


# ----- the deployment batch -------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 256])
@pytest.mark.parametrize("linear_blocks", [False, True])
def test_digits_mlp_folds_to_the_shallow_graph_at_any_deployment_batch(batch, linear_blocks):
    """ResidualMLP(64, 10) with its 8 blocks collapsed by pruning (fc1 emptied; or every block ReLU linear):
    planner="latency" gives relu(stem) → one Linear (critical path 3) at batch 1 and at batch 256."""
    torch.manual_seed(0)
    model = ResidualMLP(64, 10).eval()
    calib = torch.randn(512, 1, 8, 8)
    if linear_blocks:
        stats = forced_stats(model, calib, {f"blocks.{k}.relu": "on" for k in range(8)} | {"stem_relu": "mixed"})
    else:
        empty_layers(model, [f"blocks.{k}.fc1" for k in range(8)])
        stats = measure(model, [calib])
    folded = fold(model, stats, calib, latency_input=torch.randn(batch, 1, 8, 8), threads=1, verify=not linear_blocks)
    report = folded.fold_report
    assert report.returned == "folded", report.returned_reason
    assert report.critical_path_before == 35 and report.critical_path_after == 3
    assert [n.target for n in folded.graph.nodes if n.op == "call_module"] == ["flatten", "stem", "stem_relu", "head"]
    assert report.planner["latency_input_shape"] == [[batch, 1, 8, 8]]
