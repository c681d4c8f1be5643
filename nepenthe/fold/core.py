"""``fold``: turn a pruned model with zero-entropy rectifiers into a shallower, equivalent one.

Passes over a torch.fx graph of a copy of the model (docs/method.md §4):

1. BatchNorm (eval) is fused into the Conv/Linear before it (``torch.nn.utils.fusion``).
2. Each linearizable rectifier becomes the per-channel affine map it computes on the data
   (identity on always-ON neurons, 0 or the LeakyReLU slope on always-OFF ones, the constant
   upper kink on always-saturated ones). The map is absorbed into the producing Conv/Linear when
   that op feeds only the rectifier; otherwise a ``ChannelAffine`` module stands in its place.
   Always-OFF neurons of rectifiers that stay are zeroed at their producer.
3. Constant channels (a producer row with zero weights) are deleted from the producer and the
   consumer; a non-zero constant is added into the consumer's bias where that is exact. Emptied
   Conv/Linear ops become their constant output; constant additions ``x + c1 + c2 …`` collapse
   into one ``ChannelOffset``, absorbed into the bias of the op before or after it where exact.
4. Adjacent linear ops are merged: Linear∘Linear, Conv∘Conv (full composed kernel), and
   ``x + f(x)`` with f linear becomes one op (the skip added as identity / centred delta), as the
   planner decides (:mod:`nepenthe.fold.planner`); the latency planner then checks the whole
   model against the original (the fold, the fold without merges, or the original is returned).

Patterns not handled are left as they are, with the reason in the report; ``strict=True`` turns
those reasons into errors naming the node. The result is checked against the original model on
the example input.

This module is the driver; each pass lives in :mod:`nepenthe.fold.passes` (cleanup, rectifiers,
constants, channels, merges), the report and graph metrics in :mod:`nepenthe.fold.report`, the
merge planner in :mod:`nepenthe.fold.planner`.
"""

from __future__ import annotations

import copy
import time
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from .._utils import as_args, first_tensor
from ..entropy import EntropyStats
from ..graph import Site, TraceError, find_sites, trace
from ..mask_interop import refuse_foreign_pruning, unwrap_model
from ..masks import remove_masks
from ._fx import recompile, same_channel_dim
from .blocks import fold_blocks
from .passes.channels import remove_constant_channels
from .passes.cleanup import fuse_batchnorm, remove_noops
from .passes.constants import absorb_constant_addends, collapse_constant_additions, delete_empty_ops
from .passes.merges import merge_linear_ops
from .passes.rectifiers import approximation_errors, linearize_rectifiers
from .planner import DEFAULT_BUDGET_S, Comparison, Planner
from .report import (
    FoldError,
    FoldReport,
    count_flops,
    count_linear_ops,
    count_params,
    critical_path,
    original_variant,
    set_variant,
    variant_of,
)

__all__ = ["fold"]


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = float((out.double() - ref.double()).abs().max()) if ref.numel() else 0.0
    scale = float(ref.double().abs().max()) if ref.numel() else 0.0
    return diff, diff / scale if scale > 0 else diff


def _first_tensor(out):
    try:
        return first_tensor(out)
    except TypeError as exc:
        raise FoldError(str(exc)) from None


def _check_neuron_counts(gm: fx.GraphModule, sites: list[Site], stats: EntropyStats) -> None:
    """Statistics of another model with the same call-site names give themselves away by their
    neuron counts; applying them would fold the wrong channels."""
    for site in sites:
        hist = stats.histogram.get(site.name)
        if hist is None or site.producer is None:
            continue
        m = gm.get_submodule(site.producer)
        if same_channel_dim(m, stats.sites[site.name].channel_dim) and m.weight.shape[0] != hist.shape[0]:
            raise FoldError(f"the statistics give call site {site.name!r} {hist.shape[0]} neurons, but in this model "
                            f"it has {m.weight.shape[0]} (the outputs of {site.producer!r}); measure this model (not "
                            "another one) with nepenthe.measure before folding")


def _planner_of(planner, threads: int | None, budget_s: float | None) -> Planner:
    if isinstance(planner, Planner):
        return planner
    return Planner(planner, threads=threads, budget_s=budget_s)


def _first_sample(args: tuple) -> tuple:
    return tuple(a[:1] if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] > 1 else a for a in args)


@torch.no_grad()
def fold(
    model: nn.Module,
    stats: EntropyStats,
    example_input,
    *,
    approximate: bool = False,
    planner: str | Planner = "latency",
    latency_input=None,
    threads: int | None = None,
    budget_s: float | None = DEFAULT_BUDGET_S,
    strict: bool = False,
    verify: bool = True,
    tolerance: float = 1e-5,
) -> nn.Module:
    """A shallower copy of ``model`` with its zero-entropy rectifiers folded away (docs/method.md §4).

    ``stats`` are the statistics of ``model`` on its calibration data (``nepenthe.measure``).
    ``example_input`` (a tensor or a tuple of positional inputs) is used to check the result:
    the report's ``max_rel_error`` is max|folded − model| / max|model| on it, which is ≤ 1e-5
    in fp32 whenever every removed neuron keeps its calibration state on that input. A larger
    error is warned about (``strict=True``: raised), since it means the input leaves the states
    seen on the calibration data. The model itself is not modified; the report is attached to
    the returned module as ``fold_report``.

    ``planner`` decides which exact merges to make (see :mod:`nepenthe.fold.planner`):

    * ``"latency"`` (default): a merge that adds no FLOPs is made, one that multiplies them by
      ≥ 1.5 is not, and only those in between are timed (merged vs unmerged, on the tensor shape
      that reaches them), identical candidates once; a candidate is merged only when clearly
      faster (the ratio's confidence interval below 1 − 5 %), otherwise the FLOP rule decides, so
      decisions do not flip on noise. Then the whole folded model is timed against ``model``:
      it is returned if clearly faster, or, when the timing is inconclusive, if it has no more
      FLOPs than ``model``. Otherwise the fold **without merges** (activations dropped, BatchNorm
      fused, dead channels and emptied ops removed: it never adds work) is timed against ``model``
      and returned unless clearly slower; only then a copy of ``model`` itself (masks dropped).
      ``fold_report.returned`` says which (``"folded"``, ``"folded_no_merges"``, ``"original"``),
      ``returned_reason`` why, and ``discarded`` what the discarded folds would have given; every
      other field describes the returned model. All this timing (and the FLOP counts) stays
      within ``budget_s`` seconds (default 3; ``None``: no limit): when it is spent, undecided
      candidates take the FLOP rule and an unfinished whole-model check keeps the fold if it
      has no more FLOPs (the no-merge fold always). ``fold_report.planner`` reports the
      seconds, the budget used and how each candidate was decided (flops / timing / cache / budget).
    * ``"all"``: every exact merge (the shallowest graph; no timing). ``"none"``: no merges. Both
      return the fold without a whole-model check.

    A :class:`~nepenthe.fold.planner.Planner` instance may be passed instead (its own budget,
    margin, threads, timer and clock; its timing cache is kept across the folds it plans).

    ``latency_input`` is the **deployment batch**: the tensor(s) the latency planner times on, on
    the device you will run on. Default: the first sample of ``example_input`` (batch 1) — the
    latency case, and the cheapest to time; ``example_input`` is typically a calibration batch
    (hundreds of samples), whose timings favour other merges than a deployment at batch 1 and
    cost the planner more. Pass a batch of your serving batch size to plan for throughput.
    ``threads`` fixes the CPU threads of the timings.
    """
    model = unwrap_model(model)  # torch.compile / DDP / DataParallel: fold the module they run
    refuse_foreign_pruning(model, "fold")
    started = time.perf_counter()
    if not isinstance(stats, EntropyStats):
        raise TypeError(f"stats must be the EntropyStats of nepenthe.measure(model, data), got {type(stats).__name__}")
    plan = _planner_of(planner, threads, budget_s)
    plan.start()
    args = as_args(example_input)
    timing_args = _first_sample(args) if latency_input is None else as_args(latency_input)
    param = next(model.parameters(), None)
    if param is not None:  # timed where the model lives
        timing_args = tuple(a.to(param.device) if isinstance(a, torch.Tensor) else a for a in timing_args)
    was_training = model.training
    model.eval()
    untraceable = None
    try:
        reference = _first_tensor(model(*args)) if verify else None  # what _verify compares with
        gm = trace(copy.deepcopy(model), "folding")
    except TraceError as exc:
        untraceable = exc
    finally:
        model.train(was_training)
    if untraceable is not None:  # no graph: the MLP blocks that hooks show, folded module by module
        return fold_blocks(model, stats, example_input, approximate=approximate, reason=str(untraceable))
    gm.eval()
    remove_masks(gm)
    sites = find_sites(gm)  # once: BN fusion below keeps the activation nodes and producer names
    unknown = sorted(set(stats.histogram) - {s.name for s in sites})
    if unknown:
        raise FoldError(f"the statistics name call sites this model does not have: {unknown[:5]}; measure this model "
                        "(not another one) with nepenthe.measure before folding")
    _check_neuron_counts(gm, sites, stats)
    report = FoldReport(linear_ops_before=count_linear_ops(gm), critical_path_before=critical_path(gm),
                        params_before=count_params(gm), flops_before=count_flops(gm, args))
    if approximate:
        report.approximation_error = approximation_errors(gm, sites, stats, args)
    remove_noops(gm, report)
    fuse_batchnorm(gm, report)
    linearize_rectifiers(gm, sites, stats, report, approximate, strict)
    delete_empty_ops(gm, report)
    remove_constant_channels(gm, report)
    collapse_constant_additions(gm)
    unmerged = None
    if plan.mode == "latency":
        t0 = time.perf_counter()
        recompile(gm)
        timing_args = _propagate_shapes(gm, timing_args, args, latency_input is None)
        unmerged = (copy.deepcopy(gm), copy.deepcopy(report))  # the fold without merges, if it comes to that
        plan.spent_s += time.perf_counter() - t0
    if plan.merges:
        merge_linear_ops(gm, report, plan)
        while absorb_constant_addends(gm) | collapse_constant_additions(gm):  # a merge can expose more
            merge_linear_ops(gm, report, plan)
        remove_constant_channels(gm, report)
    _finish(gm, args, reference, report, strict, tolerance, verify)
    result: nn.Module = gm
    if plan.mode == "latency":
        result = _choose(model, gm, unmerged, args, timing_args, reference, report, plan,
                         dict(strict=strict, tolerance=tolerance, verify=verify))
    report.planner = {**plan.summary(), **{k: v for k, v in report.planner.items()},
                      "latency_input_shape": _shapes(timing_args) if plan.mode == "latency" else None}
    report.seconds = time.perf_counter() - started
    result.fold_report = report
    return result


def _shapes(args: tuple) -> list:
    return [list(a.shape) if isinstance(a, torch.Tensor) else None for a in args]


def _propagate_shapes(gm: fx.GraphModule, timing_args: tuple, args: tuple, default: bool) -> tuple:
    """Record on every node the shape that reaches it on the latency input (what candidates are
    timed at). A model that cannot run the default single sample is planned on ``example_input``."""
    try:
        ShapeProp(gm).propagate(*timing_args)
        return timing_args
    except Exception:
        if not default:
            raise
    ShapeProp(gm).propagate(*args)
    return args


def _finish(gm: fx.GraphModule, args: tuple, reference, report: FoldReport, strict: bool, tolerance: float,
            verify: bool) -> None:
    """Recompile and measure a folded graph: its report's "after" fields and its error."""
    recompile(gm)
    report.linear_ops_after = count_linear_ops(gm)
    report.critical_path_after = critical_path(gm)
    report.params_after = count_params(gm)
    report.flops_after = count_flops(gm, args)
    if verify:
        _verify(gm, args, reference, report, strict, tolerance)


def _verify(gm: fx.GraphModule, args: tuple, reference: torch.Tensor, report: FoldReport, strict: bool,
            tolerance: float) -> None:
    out = _first_tensor(gm(*args))
    if out.shape != reference.shape:
        raise FoldError(f"folded output shape {tuple(out.shape)} differs from the model's {tuple(reference.shape)}")
    report.max_abs_error, report.max_rel_error = _relative_error(out, reference)
    if report.max_rel_error > tolerance and not report.approximated:
        message = (f"folded model differs from the original on the example input: max relative error "
                   f"{report.max_rel_error:.3g} > {tolerance:g}. The input leaves neuron states seen on the "
                   "calibration data (use calibration samples to check exactness).")
        if strict:
            raise FoldError(message)
        warnings.warn(message, stacklevel=3)


def _removed_anything(report: FoldReport) -> bool:
    return bool(report.rectifier_layers_removed or report.ops_merged or report.ops_deleted or report.channels_removed)


def _describe(c: Comparison) -> str:
    if c.verdict == "unmeasured":
        return "not timed (planner budget spent)"
    return f"time ratio {c.ratio:.3f}, confidence interval [{c.low:.3f}, {c.high:.3f}] over {c.rounds} rounds"


def _choose(model: nn.Module, gm: fx.GraphModule, unmerged, args: tuple, timing_args: tuple, reference,
            report: FoldReport, plan: Planner, check: dict) -> nn.Module:
    """The whole-model check of the latency planner (see ``fold``): the folded model, the fold
    without merges, or a copy of ``model``; the report is made to describe the one returned."""
    checks: list[dict] = []
    report.planner = {"whole_model": checks, "model_ms": None}
    if not _removed_anything(report):
        report.discarded["folded"] = {**variant_of(report), "reason": "nothing was removed, merged or deleted"}
        return _original(model, report, "no rectifier, op or channel could be removed: the original model")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()

    def timed(name: str, candidate: nn.Module, want: str) -> Comparison:
        c = plan.compare(lambda: model(*timing_args), lambda: candidate(*timing_args), device, want=want,
                         min_rounds=plan.model_min_rounds)
        checks.append({"model": name, **c.to_dict()})
        report.planner["model_ms"] = {"unfolded": c.old_ms, "folded": c.new_ms, "ratio": c.ratio, "low": c.low,
                                      "high": c.high, "verdict": c.verdict, "model": name}
        return c

    try:
        candidate, name = gm, "folded"
        if report.ops_merged:
            c = timed("folded", gm, "faster")
            if c.verdict == "faster":
                report.returned, report.returned_reason = "folded", f"clearly faster than the original: {_describe(c)}"
                return gm
            no_more_flops = report.flops_after is not None and report.flops_after <= report.flops_before
            if c.verdict in ("tie", "unmeasured") and no_more_flops:
                report.returned, report.returned_reason = "folded", (
                    f"{_describe(c)}: not clearly faster or slower; kept by the FLOP rule (no more FLOPs than "
                    "the original)")
                return gm
            why = ("clearly slower than the original" if c.verdict == "slower"
                   else "not clearly faster than the original and more FLOPs")
            report.discarded["folded"] = {**variant_of(report), "reason": f"{why}: {_describe(c)}"}
            candidate, base_report = unmerged
            name = "folded_no_merges"
            _finish(candidate, args, reference, base_report, check["strict"], check["tolerance"], check["verify"])
            set_variant(report, variant_of(base_report))
        c = timed(name, candidate, "slower")
        if c.verdict != "slower":
            what = "the fold without merges" if name != "folded" else "the fold (no merges were made)"
            report.returned = name
            report.returned_reason = (f"{what} is clearly faster than the original: {_describe(c)}"
                                      if c.verdict == "faster" else
                                      f"{what} is not clearly slower than the original ({_describe(c)}) and "
                                      "never adds work")
            if name != "folded":
                report.returned_reason += f"; the fold with merges was {report.discarded['folded']['reason']}"
            return candidate
        report.discarded[name] = {**variant_of(report), "reason": f"clearly slower than the original: {_describe(c)}"}
        return _original(model, report, f"every fold measured clearly slower than the original ({_describe(c)})")
    finally:
        model.train(was_training)


def _original(model: nn.Module, report: FoldReport, reason: str) -> nn.Module:
    report.returned, report.returned_reason = "original", reason
    set_variant(report, original_variant(report))
    return remove_masks(copy.deepcopy(model)).eval()
