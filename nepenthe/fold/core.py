"""``fold``: turn a pruned model with zero-entropy rectifiers into a shallower, equivalent one.

Passes over a torch.fx graph of a copy of the model (SPEC §4):

1. BatchNorm (eval) is fused into the Conv/Linear before it (``torch.nn.utils.fusion``).
2. Each linearizable rectifier becomes the per-channel affine map it computes on the data
   (identity on always-ON neurons, 0 or the LeakyReLU slope on always-OFF ones, the constant
   upper kink on always-saturated ones). The map is absorbed into the producing Conv/Linear when
   that op feeds only the rectifier; otherwise a ``ChannelAffine`` module stands in its place.
   Always-OFF neurons of rectifiers that stay are zeroed at their producer.
3. Constant channels (a producer row with zero weights) are deleted from the producer and the
   consumer; a non-zero constant is added into the consumer's bias where that is exact.
4. Adjacent linear ops are merged: Linear∘Linear, Conv∘Conv (full composed kernel), and
   ``x + f(x)`` with f linear becomes one op (the skip added as identity / centred delta).

Patterns not handled are left as they are, with the reason in the report; ``strict=True`` turns
those reasons into errors naming the node. The result is checked against the original model on
the example input.
"""

from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..activations import ADD_FUNCTIONS, BATCHNORM_MODULES, Rectifier, rectifier_of_call, rectifier_of_module
from ..entropy import EntropyStats
from ..graph import Site, find_sites, trace
from ..masks import remove_masks
from . import algebra


class FoldError(RuntimeError):
    """Folding cannot proceed as asked (strict mode, mismatched statistics, ...)."""


@dataclass
class FoldReport:
    """What folding did. ``rectifier_layers_removed`` is the paper's "Rem." count."""

    rectifier_layers_total: int = 0
    rectifier_layers_removed: int = 0
    removed: list[str] = field(default_factory=list)
    approximated: list[str] = field(default_factory=list)  # GELU/SiLU/Hardswish linearized on request
    batchnorms_fused: int = 0
    ops_merged: int = 0
    merges: list[str] = field(default_factory=list)
    channels_removed: dict[str, int] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)  # {"node": ..., "reason": ...}
    linear_ops_before: int = 0
    linear_ops_after: int = 0
    critical_path_before: int = 0
    critical_path_after: int = 0
    params_before: int = 0
    params_after: int = 0
    max_abs_error: float | None = None
    max_rel_error: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _skip(report: FoldReport, strict: bool, node: str, reason: str) -> None:
    if strict:
        raise FoldError(f"cannot fold {node!r}: {reason}")
    report.skipped.append({"node": node, "reason": reason})


def _module(gm: fx.GraphModule, node) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        return gm.get_submodule(node.target)
    return None


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_name, _, child = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, child, module)


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _same_channel_dim(m: nn.Module, channel_dim: int | None) -> bool:
    """Whether the rectifier's neurons are the module's output channels (None: unknown, assumed)."""
    return channel_dim is None or channel_dim == (-1 if isinstance(m, nn.Linear) else 1)


# ----- graph measurements ---------------------------------------------------------------------
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
    return sum(1 for n in gm.graph.nodes if isinstance(_module(gm, n), algebra.LinearLike.__args__))


def _params(m: nn.Module) -> int:
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


# ----- pass 1: BatchNorm ----------------------------------------------------------------------
def fuse_batchnorm(gm: fx.GraphModule, report: FoldReport) -> None:
    for node in list(gm.graph.nodes):
        bn = _module(gm, node)
        if not isinstance(bn, BATCHNORM_MODULES) or not node.args:
            continue
        producer = node.args[0]
        conv = _module(gm, producer)
        if conv is None or _only_user(producer) is not node or not bn.track_running_stats:
            continue
        if isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            fused = fuse_conv_bn_eval(conv, bn)
        elif isinstance(conv, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
            fused = fuse_linear_bn_eval(conv, bn)
        else:
            continue
        _set_module(gm, producer.target, fused)
        node.replace_all_uses_with(producer)
        gm.graph.erase_node(node)
        report.batchnorms_fused += 1


# ----- pass 2: rectifiers -----------------------------------------------------------------------
def _is_inplace(gm: fx.GraphModule, node: fx.Node) -> bool:
    m = _module(gm, node)
    if m is not None:
        return bool(getattr(m, "inplace", False))
    target = node.target
    return bool(node.kwargs.get("inplace")) or target in ("relu_",) or getattr(target, "__name__", "").endswith("_")


def _region_affine(rect: Rectifier, off: torch.Tensor, sat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (slope, offset) of a linearized rectifier."""
    regions = rect.region_affine()
    slope = torch.ones(off.shape[0], dtype=torch.float64)
    offset = torch.zeros(off.shape[0], dtype=torch.float64)
    slope[off] = regions["off"][0]
    if "sat" in regions:
        slope[sat] = regions["sat"][0]
        offset[sat] = regions["sat"][1]
    return slope, offset


def linearize_rectifiers(gm: fx.GraphModule, sites: list[Site], stats: EntropyStats, report: FoldReport,
                         approximate: bool, strict: bool) -> None:
    report.rectifier_layers_total = len(sites)
    for site in sites:
        name, node, rect = site.name, site.node, site.rectifier
        if name not in stats.histogram:
            _skip(report, strict, name, "no statistics for this call site (not reached by the calibration data)")
            continue
        off = stats.always_off[name].cpu()
        if not stats.linearizable(name):
            _zero_dead_neurons(gm, node, rect, off, stats.sites[name].channel_dim)
            continue
        if not rect.exact and not approximate:
            _skip(report, strict, name, f"{rect.kind} is only approximately linear on each side of 0; pass "
                                        "approximate=True to replace it (its error is then reported)")
            continue
        if _is_inplace(gm, node) and len(node.args[0].users) > 1:
            _skip(report, strict, name, "an inplace activation whose input is also used elsewhere")
            continue
        slope, offset = _region_affine(rect, off, stats.always_saturated[name].cpu())
        channel_dim = stats.sites[name].channel_dim
        producer = node.args[0]
        prod_module = _module(gm, producer)
        if (algebra.is_foldable(prod_module) and _only_user(producer) is node
                and _same_channel_dim(prod_module, channel_dim)
                and prod_module.weight.shape[0] == slope.numel()):
            algebra.scale_output_channels_(prod_module, slope, offset)
            node.replace_all_uses_with(producer)
        else:
            replacement = producer
            if not (bool((slope == 1).all()) and bool((offset == 0).all())):
                dtype = prod_module.weight.dtype if prod_module is not None and hasattr(prod_module, "weight") \
                    else torch.float32
                target = f"{name.replace('.', '_').replace('#', '_').replace('()', '')}_affine"
                gm.add_submodule(target, algebra.ChannelAffine(slope.to(dtype), offset.to(dtype), channel_dim))
                with gm.graph.inserting_after(node):
                    replacement = gm.graph.call_module(target, (producer,))
            node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        report.removed.append(name)
        if not rect.exact:
            report.approximated.append(name)
    report.rectifier_layers_removed = len(report.removed)


def _zero_dead_neurons(gm: fx.GraphModule, node: fx.Node, rect: Rectifier, off: torch.Tensor, channel_dim) -> None:
    """Always-OFF neurons of a ReLU/ReLU6 that stays output 0 on the data: make their input 0 too,
    so the constant-channel pass can delete them."""
    if not (rect.exact and rect.off_slope == 0.0) or not bool(off.any()):
        return
    producer = node.args[0]
    m = _module(gm, producer)
    if algebra.is_foldable(m) and _only_user(producer) is node and m.weight.shape[0] == off.numel() \
            and _same_channel_dim(m, channel_dim):
        keep = (~off).to(torch.float64)
        algebra.scale_output_channels_(m, keep, torch.zeros_like(keep))


# ----- pass 3: constant channels ------------------------------------------------------------------
def _rectifier_between(gm: fx.GraphModule, node: fx.Node) -> Rectifier | None:
    m = _module(gm, node)
    if m is not None:
        return rectifier_of_module(m)
    return rectifier_of_call(node.op, node.target, node.args, node.kwargs)


def remove_constant_channels(gm: fx.GraphModule, report: FoldReport) -> None:
    for node in list(gm.graph.nodes):
        prod = _module(gm, node)
        if not algebra.is_foldable(prod):
            continue
        user = _only_user(node)
        if user is None:
            continue
        rect = _rectifier_between(gm, user)
        consumer_node = _only_user(user) if rect is not None else user
        cons = _module(gm, consumer_node) if consumer_node is not None else None
        if not algebra.is_foldable(cons) or consumer_node.args[0] is not (user if rect is not None else node):
            continue
        if type(cons) is not type(prod) and not (isinstance(prod, nn.Linear) or isinstance(cons, nn.Linear)):
            continue
        if isinstance(prod, nn.Linear) != isinstance(cons, nn.Linear):
            continue  # a flatten or reshape would be needed in between
        w = prod.weight.detach()
        bias = prod.bias.detach() if prod.bias is not None else torch.zeros(w.shape[0], device=w.device)
        constant = (w.flatten(1) == 0).all(dim=1)
        if not bool(constant.any()):
            continue
        values = bias.to(torch.float64)
        if rect is not None:
            values = rect.apply(values)
        nonzero = constant & (values != 0)
        padded = not isinstance(cons, nn.Linear) and any(p != 0 for p in cons.padding)
        removable = constant & ~nonzero if padded else constant
        if not bool(removable.any()):
            continue
        if bool(removable.all()):  # keep one channel (it still adds its constant) so both ops stay well-formed
            removable = removable.clone()
            removable[0] = False
        idx = (removable & nonzero).nonzero().squeeze(1)
        if idx.numel():
            algebra.absorb_constant_inputs_(cons, values[idx], idx)
        keep = ~removable
        _set_module(gm, node.target, algebra.select_output_channels(prod, keep))
        _set_module(gm, consumer_node.target, algebra.select_input_channels(cons, keep))
        report.channels_removed[node.target] = report.channels_removed.get(node.target, 0) + int(removable.sum())


# ----- pass 4: merging ------------------------------------------------------------------------------
def _merge_once(gm: fx.GraphModule, report: FoldReport, strict: bool) -> bool:
    for node in gm.graph.nodes:
        # x + f(x) with f linear -> one op
        if node.op == "call_function" and node.target in ADD_FUNCTIONS and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            for skip, body in ((a, b), (b, a)):
                m = _module(gm, body)
                if (algebra.is_foldable(m) and _only_user(body) is node and body.args
                        and body.args[0] is skip and algebra.identity_blocker(m) is None):
                    _set_module(gm, body.target, algebra.add_identity(m))
                    node.replace_all_uses_with(body)
                    gm.graph.erase_node(node)
                    report.ops_merged += 1
                    report.merges.append(f"skip + {body.target}")
                    return True
        second = _module(gm, node)
        if not algebra.is_foldable(second) or not node.args:
            continue
        prev = node.args[0]
        first = _module(gm, prev)
        if not algebra.is_foldable(first) or _only_user(prev) is not node:
            continue
        if isinstance(first, nn.Linear) and isinstance(second, nn.Linear):
            merged = algebra.merge_linear_linear(first, second)
        elif isinstance(first, nn.Linear) or isinstance(second, nn.Linear):
            continue
        else:
            reason = algebra.conv_merge_blocker(first, second)
            if reason:
                key = f"{prev.target} -> {node.target}"
                if not any(s["node"] == key for s in report.skipped):
                    _skip(report, False, key, reason)  # a merge not done is never an error
                continue
            merged = algebra.merge_conv_conv(first, second)
        _set_module(gm, node.target, merged)
        node.args = (prev.args[0],) + tuple(node.args[1:])
        gm.graph.erase_node(prev)
        report.ops_merged += 1
        report.merges.append(f"{prev.target} + {node.target}")
        return True
    return False


def merge_linear_ops(gm: fx.GraphModule, report: FoldReport, strict: bool) -> None:
    while _merge_once(gm, report, strict):
        pass


# ----- entry point ----------------------------------------------------------------------------------
def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = float((out.double() - ref.double()).abs().max()) if ref.numel() else 0.0
    scale = float(ref.double().abs().max()) if ref.numel() else 0.0
    return diff, diff / scale if scale > 0 else diff


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    if isinstance(out, dict) and out:
        return _first_tensor(next(iter(out.values())))
    raise FoldError(f"cannot compare model outputs of type {type(out).__name__}")


def _check_neuron_counts(gm: fx.GraphModule, sites: list[Site], stats: EntropyStats) -> None:
    """Statistics of another model with the same call-site names give themselves away by their
    neuron counts; applying them would fold the wrong channels."""
    for site in sites:
        hist = stats.histogram.get(site.name)
        if hist is None or site.producer is None:
            continue
        m = gm.get_submodule(site.producer)
        if _same_channel_dim(m, stats.sites[site.name].channel_dim) and m.weight.shape[0] != hist.shape[0]:
            raise FoldError(f"the statistics give call site {site.name!r} {hist.shape[0]} neurons, but in this model "
                            f"it has {m.weight.shape[0]} (the outputs of {site.producer!r}); measure this model (not "
                            "another one) with nepenthe.measure before folding")


@torch.no_grad()
def fold(
    model: nn.Module,
    stats: EntropyStats,
    example_input,
    *,
    approximate: bool = False,
    merge: bool = True,
    strict: bool = False,
    verify: bool = True,
    tolerance: float = 1e-5,
) -> fx.GraphModule:
    """A shallower copy of ``model`` with its zero-entropy rectifiers folded away (SPEC §4).

    ``stats`` are the statistics of ``model`` on its calibration data (``nepenthe.measure``).
    ``example_input`` (a tensor or a tuple of positional inputs) is used to check the result:
    the report's ``max_rel_error`` is max|folded − model| / max|model| on it, which is ≤ 1e-5
    in fp32 whenever every removed neuron keeps its calibration state on that input. A larger
    error is warned about (``strict=True``: raised), since it means the input leaves the states
    seen on the calibration data. The model itself is not modified; the report is attached to
    the returned module as ``fold_report``.
    """
    if not isinstance(stats, EntropyStats):
        raise TypeError(f"stats must be the EntropyStats of nepenthe.measure(model, data), got {type(stats).__name__}")
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    was_training = model.training
    model.eval()
    try:
        reference = _first_tensor(model(*args))
        gm = trace(copy.deepcopy(model), "folding")
    finally:
        model.train(was_training)
    gm.eval()
    remove_masks(gm)
    sites = find_sites(gm)  # once: BN fusion below keeps the activation nodes and producer names
    unknown = sorted(set(stats.histogram) - {s.name for s in sites})
    if unknown:
        raise FoldError(f"the statistics name call sites this model does not have: {unknown[:5]}; measure this model "
                        "(not another one) with nepenthe.measure before folding")
    _check_neuron_counts(gm, sites, stats)
    report = FoldReport(linear_ops_before=count_linear_ops(gm), critical_path_before=critical_path(gm),
                        params_before=_params(gm))
    fuse_batchnorm(gm, report)
    linearize_rectifiers(gm, sites, stats, report, approximate, strict)
    remove_constant_channels(gm, report)
    if merge:
        merge_linear_ops(gm, report, strict)
        remove_constant_channels(gm, report)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    report.linear_ops_after = count_linear_ops(gm)
    report.critical_path_after = critical_path(gm)
    report.params_after = _params(gm)
    if verify:
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
            warnings.warn(message, stacklevel=2)
    gm.fold_report = report
    return gm
