"""The fold planner: which exact merges to make, decided from measured latency (SPEC §4.5).

Merging is exact but not always faster: two 3×3 convs become one 5×5 (more FLOPs), a depthwise conv
merged with a pointwise one becomes a dense conv. For every merge candidate the planner times the
unmerged ops against the merged op on a tensor of the shape that really reaches them (from the
latency input, on its device and batch size), with the timing blocks interleaved, and merges only
when the merged op is faster. Dropping activations, fusing BatchNorm and deleting constant channels
never add work, so they are not planned.

Modes: ``"latency"`` (measure, the default of ``fold``), ``"all"`` (every exact merge: the
shallowest graph, what the exactness tests use), ``"none"`` (drop activations only, no merges).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from ..latency import compare_calls

PLANNER_MODES = ("latency", "all", "none")


@dataclass
class Candidate:
    """One possible exact merge in the graph."""

    key: str  # e.g. "layer1.0.conv1 + layer1.0.conv2", stable while neither op changes
    input_node: fx.Node  # the tensor both computations read
    unmerged: Callable[[torch.Tensor], torch.Tensor]  # what the graph computes now
    build: Callable[[], nn.Module]  # the merged op (built only when considered)
    apply: Callable[[nn.Module], None]  # rewrite the graph to use it
    corrected: bool = False  # the merged op needs a border correction (tried after the plain merges)


@dataclass
class Planner:
    mode: str = "latency"
    repeats: int = 9
    warmup: int = 3
    threads: int | None = None
    decisions: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.mode not in PLANNER_MODES:
            raise ValueError(f"planner must be one of {PLANNER_MODES}, got {self.mode!r}")

    @property
    def merges(self) -> bool:
        return self.mode != "none"

    @torch.no_grad()
    def accept(self, candidate: Candidate, merged: nn.Module) -> bool:
        if self.mode == "all":
            return True
        if self.mode == "none":
            return False
        x = _example_for(candidate.input_node, merged)
        if x is None:  # no shape known for this tensor: cannot measure, so do not risk a slower op
            self.decisions.append({"candidate": candidate.key, "merged": False,
                                   "reason": "no example tensor shape reaches this op"})
            return False
        unmerged = candidate.unmerged
        timings = compare_calls({"unmerged": lambda: _no_grad(unmerged, x), "merged": lambda: _no_grad(merged, x)},
                                warmup=self.warmup, repeats=self.repeats, threads=self.threads,
                                device=x.device)
        before, after = timings["unmerged"].median_ms, timings["merged"].median_ms
        ratio = paired_ratio(timings["unmerged"], timings["merged"])
        accepted = ratio < 1.0
        self.decisions.append({"candidate": candidate.key, "merged": accepted, "unmerged_ms": before,
                               "merged_ms": after, "ratio": ratio, "shape": list(x.shape)})
        return accepted


def paired_ratio(before, after) -> float:
    """Median over rounds of after/before, each round's two blocks timed back to back: load from
    other processes hits both blocks of a round alike, so this is steadier than a ratio of medians."""
    ratios = sorted(b / a for a, b in zip(before.samples_ms, after.samples_ms) if a > 0)
    if not ratios:
        return after.median_ms / before.median_ms if before.median_ms > 0 else 1.0
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else 0.5 * (ratios[mid - 1] + ratios[mid])


def _no_grad(fn, x):
    with torch.no_grad():
        return fn(x)


def _example_for(node: fx.Node, module: nn.Module) -> torch.Tensor | None:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.randn(tuple(meta.shape), dtype=meta.dtype, device=device)
    if getattr(meta, "memory_format", None) == torch.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
