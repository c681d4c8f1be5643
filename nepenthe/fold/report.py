"""What folding did (:class:`FoldReport`), the error it raises, and the graph metrics the
report holds (linear ops, critical path, parameters, FLOPs)."""

from __future__ import annotations

import copy
import operator
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import FoldError
from . import algebra
from ._fx import module_of

__all__ = ["VARIANT_FIELDS", "count_flops", "count_linear_ops", "count_params", "critical_path", "FoldReport",
           "note_blocked", "original_variant", "set_variant", "skip", "variant_of"]


@dataclass
class FoldReport:
    """What folding did. Every count and "after" field describes the model ``fold`` returned
    (``returned``): when it handed back the original model (or the fold without merges), what the
    discarded fold would have given is in ``discarded``, with the reason. ``rectifier_layers_removed``
    is the paper's "Rem." count."""

    rectifier_layers_total: int = 0
    rectifier_layers_removed: int = 0
    removed: list[str] = field(default_factory=list)
    approximated: list[str] = field(default_factory=list)  # GELU/SiLU/Hardswish linearized on request
    batchnorms_fused: int = 0
    ops_merged: int = 0
    merges: list[str] = field(default_factory=list)
    channels_removed: dict[str, int] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)  # {"node": ..., "reason": ...}
    ops_deleted: list[str] = field(default_factory=list)  # emptied Conv/Linear replaced by their constant output
    noops_removed: int = 0  # Dropout / Identity (eval)
    linear_ops_before: int = 0
    linear_ops_after: int = 0
    critical_path_before: int = 0
    critical_path_after: int = 0
    params_before: int = 0
    params_after: int = 0
    flops_before: int | None = None  # on the example input (2 per multiply-add of matmuls / convs)
    flops_after: int | None = None
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    # per approximated (GELU/SiLU/Hardswish) call site, on the example input: how far its linear
    # replacement is from the activation itself (max/mean |φ(z) − affine(z)|, and max relative to max|φ(z)|)
    approximation_error: dict[str, dict] = field(default_factory=dict)
    # mode, seconds, budget, candidates decided by FLOPs / timing / cache / budget, per-candidate
    # decisions, whole-model checks (see nepenthe.fold.planner)
    planner: dict = field(default_factory=dict)
    # "folded" (the planner's merges), "folded_no_merges" (activations dropped, BN fused, dead
    # channels / emptied ops removed, no merge) or "original" (a copy of the model, masks dropped)
    returned: str = "folded"
    returned_reason: str = ""
    # model name ("folded", "folded_no_merges") -> its VARIANT_FIELDS and the "reason" it was not returned
    discarded: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0  # wall time of fold
    # "graph": a torch.fx graph was rewritten; "modules": no graph, MLP blocks merged module by module
    # (nepenthe.fold.blocks), saved as a patch of the original architecture (nepenthe.fold.patch)
    route: str = "graph"

    def to_dict(self) -> dict:
        return asdict(self)


# the fields that describe one particular folded (or the original) model


VARIANT_FIELDS = ("rectifier_layers_removed", "removed", "approximated", "batchnorms_fused", "ops_merged", "merges",
                  "channels_removed", "ops_deleted", "noops_removed", "linear_ops_after", "critical_path_after",
                  "params_after", "flops_after", "max_abs_error", "max_rel_error", "approximation_error")


def variant_of(report: FoldReport) -> dict:
    return copy.deepcopy({k: getattr(report, k) for k in VARIANT_FIELDS})


def set_variant(report: FoldReport, values: dict) -> None:
    for k in VARIANT_FIELDS:
        setattr(report, k, copy.deepcopy(values[k]))


def original_variant(report: FoldReport) -> dict:
    """The variant fields of the unchanged model: nothing removed, "after" = "before", exact."""
    return dict(rectifier_layers_removed=0, removed=[], approximated=[], batchnorms_fused=0, ops_merged=0, merges=[],
                channels_removed={}, ops_deleted=[], noops_removed=0, linear_ops_after=report.linear_ops_before,
                critical_path_after=report.critical_path_before, params_after=report.params_before,
                flops_after=report.flops_before, max_abs_error=0.0, max_rel_error=0.0, approximation_error={})


def skip(report: FoldReport, strict: bool, node: str, reason: str) -> None:
    if strict:
        raise FoldError(f"cannot fold {node!r}: {reason}")
    report.skipped.append({"node": node, "reason": reason})


def note_blocked(report: FoldReport, key: str, reason: str) -> None:
    if not any(s["node"] == key for s in report.skipped):
        skip(report, False, key, reason)  # a merge not done is never an error


_SHAPE_ONLY = {"size", "dim", "view", "reshape", "flatten", "contiguous", "permute", "transpose"}


def _is_compute(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return not isinstance(gm.get_submodule(node.target), (nn.Identity, nn.Flatten, nn.Dropout))
    if node.op == "call_method":
        return node.target not in _SHAPE_ONLY
    return node.op == "call_function" and node.target is not operator.getitem


def critical_path(gm: fx.GraphModule) -> int:
    """Longest chain of compute ops from any input to the output."""
    depth: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        base = max((depth[p] for p in node.all_input_nodes), default=0)
        depth[node] = base + (1 if _is_compute(gm, node) else 0)
    return max(depth.values(), default=0)


def count_linear_ops(gm: fx.GraphModule) -> int:
    """Conv/Linear calls in the graph (a border-corrected composed conv counts as one)."""
    return sum(1 for n in gm.graph.nodes if isinstance(module_of(gm, n), algebra.LinearLike.__args__)
               or algebra.is_composed_conv(module_of(gm, n)))


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, example_input) -> int:
    """FLOPs of one forward on ``example_input`` (2 per multiply-add of matmuls and convolutions;
    elementwise ops are not counted), by ``torch.utils.flop_counter.FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    args = example_input if isinstance(example_input, tuple) else (example_input,)
    counter = FlopCounterMode(display=False)
    with counter:
        model(*args)
    return int(counter.get_total_flops())
