"""Folding without a graph: the MLP blocks of a model torch.fx cannot trace (Hugging Face
transformers, data-dependent control flow).

The graph route (:mod:`nepenthe.fold.core`) needs a trace. Without one, a forward pass with hooks
shows the blocks that can still be folded exactly: a ``nn.Linear`` P whose output tensor is the
input of a rectifier module A, whose output tensor is the input of a ``nn.Linear`` C. When every
neuron of A is in one state on the data (zero entropy: ON, OFF or SAT), A is an affine map
``s * z + e`` per neuron, and ``C(A(P(x))) = (Wc diag(s) Wp) x + Wc (s * bp + e) + bc``: one Linear in
P's place, A and C replaced by ``nn.Identity``. Hooks cannot see whether P's or A's output is also
used elsewhere, so each block is folded on a copy and kept only when the model's output on the
example input is unchanged (within ``tolerance``, relative to the output's largest magnitude);
otherwise it is left as it was and reported in ``skipped``. A rectifier fed by anything else (a
gated MLP's ``act(gate(x)) * up(x)``: a product, which no single Linear can express) is reported
as skipped with that reason.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn

from .._utils import as_args, first_tensor, set_submodule
from ..activations import rectifier_of_module
from ..entropy import EntropyStats
from ..masks import remove_masks
from .report import FoldReport, count_params

__all__ = ["fold_blocks"]


def _links(model: nn.Module, args: tuple) -> tuple[dict[str, tuple[str | None, list[str]]], dict[str, int]]:
    """``{rectifier path: (producer Linear or None, [Linears consuming its output tensor])}`` and how
    many times each rectifier and Linear module ran, from one forward with hooks."""
    linear_out: dict[int, tuple[str, torch.Tensor]] = {}
    # tensors are kept alive with their ids, so that no id is reused by another tensor during the forward
    consumers: dict[int, list[tuple[str, torch.Tensor]]] = {}
    acts: dict[str, tuple[str | None, torch.Tensor]] = {}
    calls: dict[str, int] = {}
    handles = []

    def on_linear(path):
        def pre(module, inputs):
            if inputs and isinstance(inputs[0], torch.Tensor):
                consumers.setdefault(id(inputs[0]), []).append((path, inputs[0]))

        def post(module, inputs, out):
            calls[path] = calls.get(path, 0) + 1
            linear_out[id(out)] = (path, out)
        return pre, post

    def on_act(path):
        def post(module, inputs, out):
            calls[path] = calls.get(path, 0) + 1
            hit = linear_out.get(id(inputs[0])) if inputs else None
            producer = hit[0] if hit is not None and hit[1] is inputs[0] else None
            acts[path] = (producer, out)
        return post

    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            pre, post = on_linear(path)
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        elif rectifier_of_module(module) is not None:
            handles.append(module.register_forward_hook(on_act(path)))
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return {path: (producer, [p for p, t in consumers.get(id(out), []) if t is out])
            for path, (producer, out) in acts.items()}, calls


def _affine(stats: EntropyStats, site: str, approximate: bool) -> tuple[torch.Tensor, torch.Tensor] | str:
    """(slope, offset) per neuron of a rectifier whose every neuron keeps one state on the data, or
    the reason it cannot be folded."""
    rect = stats.sites[site].rectifier
    if not rect.exact and not approximate:
        return f"{rect.kind} is linear only approximately (fold(..., approximate=True) folds it)"
    on, off, sat = stats.always_on[site], stats.always_off[site], stats.always_saturated[site]
    if not bool((on | off | sat).all()):
        return "neurons change state on the data (entropy > 0)"
    regions = rect.region_affine()
    slope = torch.where(off, regions["off"][0], regions["on"][0]).double()
    offset = torch.zeros_like(slope)
    if "sat" in regions:
        slope = torch.where(sat, regions["sat"][0], slope)
        offset = torch.where(sat, regions["sat"][1], offset)
    return slope, offset


def _merged(p: nn.Linear, c: nn.Linear, slope: torch.Tensor, offset: torch.Tensor) -> nn.Linear:
    """The Linear equal to ``c(slope * p(x) + offset)``, composed in float64."""
    wp, wc = p.weight.double(), c.weight.double()
    bp = p.bias.double() if p.bias is not None else torch.zeros(wp.shape[0], dtype=torch.float64, device=wp.device)
    bc = c.bias.double() if c.bias is not None else torch.zeros(wc.shape[0], dtype=torch.float64, device=wc.device)
    slope, offset = slope.to(wp.device), offset.to(wp.device)
    merged = nn.Linear(wp.shape[1], wc.shape[0], bias=True, device=wp.device, dtype=p.weight.dtype)
    with torch.no_grad():
        merged.weight.copy_(wc @ (slope[:, None] * wp))
        merged.bias.copy_(wc @ (slope * bp + offset) + bc)
    return merged


class _NeuronAffine(nn.Module):
    """``x * slope + offset`` along the last dim (a Linear's output features): what a rectifier is on
    the data when every neuron keeps one state."""

    def __init__(self, slope: torch.Tensor, offset: torch.Tensor):
        super().__init__()
        self.register_buffer("slope", slope)
        self.register_buffer("offset", offset)

    def forward(self, x):
        return x * self.slope.to(x.dtype) + self.offset.to(x.dtype)


def fold_blocks(model: nn.Module, stats: EntropyStats, example_input, *, approximate: bool = False,
                tolerance: float = 1e-4, reason: str = "") -> nn.Module:
    """A copy of ``model`` with every foldable Linear → rectifier → Linear block merged into one
    Linear (see the module docstring), its :class:`FoldReport` attached as ``fold_report``.
    ``reason``: why the graph route was not taken (recorded in the report)."""
    started = time.perf_counter()
    args = as_args(example_input)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference = first_tensor(model(*args)).detach()
        folded = remove_masks(copy.deepcopy(model)).eval()  # as on the graph route: an inference model
        links, calls = _links(folded, args)
    finally:
        model.train(was_training)
    scale = float(reference.abs().max()) or 1.0
    report = FoldReport(params_before=count_params(folded), rectifier_layers_total=len(stats.histogram),
                        route="modules")
    report.skipped.append({"node": "(model)", "reason": f"no torch.fx graph, MLP blocks folded by modules: {reason}"})
    for site, (producer, consumer_list) in links.items():
        if site not in stats.histogram:
            continue
        once = producer is not None and len(consumer_list) == 1 and all(
            calls.get(m) == 1 for m in (producer, site, consumer_list[0]))
        if not once:
            why = ("its input is not a Linear's output" if producer is None else
                   "its output does not feed exactly one Linear (a gated MLP's product, a residual)"
                   if len(consumer_list) != 1 else "a module of the block runs more than once per forward (shared)")
            report.skipped.append({"node": site, "reason": why})
            continue
        affine = _affine(stats, site, approximate)
        if isinstance(affine, str):
            report.skipped.append({"node": site, "reason": affine})
            continue
        p, c = folded.get_submodule(producer), folded.get_submodule(consumer_list[0])
        saved = {path: folded.get_submodule(path) for path in (producer, site, consumer_list[0])}
        with torch.no_grad():  # the rectifier as its affine map: the approximation, measured alone
            set_submodule(folded, site, _NeuronAffine(*(t.to(p.weight.device, torch.float32) for t in affine)))
            linearized = first_tensor(folded(*args))
            set_submodule(folded, producer, _merged(p, c, *affine))
            set_submodule(folded, site, nn.Identity())
            set_submodule(folded, consumer_list[0], nn.Identity())
            try:
                error = float((first_tensor(folded(*args)) - linearized).abs().max()) / scale
            except Exception:  # noqa: BLE001 - e.g. a shape that another use of these modules expected
                error = float("inf")
        if not error <= tolerance:  # the merge is not exact here (an output was used elsewhere): undo
            for path, module in saved.items():
                set_submodule(folded, path, module)
            report.skipped.append({"node": site, "reason": f"merging {producer} and {consumer_list[0]} changed the "
                                                            f"output by {error:.2e} (relative): left as it was"})
            continue
        if not stats.sites[site].rectifier.exact:
            report.approximation_error[site] = {
                "max_rel_error": float((linearized - reference).abs().max()) / scale}
        report.removed.append(site)
        if not stats.sites[site].rectifier.exact:
            report.approximated.append(site)
        report.merges.append(f"{producer} + {consumer_list[0]}")
        report.ops_merged += 1
    report.rectifier_layers_removed = len(report.removed)
    report.params_after = count_params(folded)
    with torch.no_grad():
        diff = (first_tensor(folded(*args)) - reference).abs().max()
    report.max_abs_error, report.max_rel_error = float(diff), float(diff) / scale
    report.returned = "folded" if report.merges else "original"
    report.returned_reason = "" if report.merges else "no MLP block could be folded without a graph"
    report.seconds = time.perf_counter() - started
    folded.fold_report = report
    return folded
