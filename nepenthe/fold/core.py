"""``fold``: turn a pruned model with zero-entropy rectifiers into a shallower, equivalent one.

Passes over a torch.fx graph of a copy of the model (SPEC §4):

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
"""

from __future__ import annotations

import copy
import operator
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..activations import (
    ADD_FUNCTIONS,
    BATCHNORM_MODULES,
    PASS_THROUGH_MODULES,
    Rectifier,
    rectifier_of_call,
    rectifier_of_module,
)
from ..entropy import EntropyStats
from ..graph import Site, find_sites, trace
from ..masks import remove_masks
from . import algebra, border
from .planner import DEFAULT_BUDGET_S, Candidate, Comparison, Planner


class FoldError(RuntimeError):
    """Folding cannot proceed as asked (strict mode, mismatched statistics, ...)."""


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

    def to_dict(self) -> dict:
        return asdict(self)


# the fields that describe one particular folded (or the original) model
VARIANT_FIELDS = ("rectifier_layers_removed", "removed", "approximated", "batchnorms_fused", "ops_merged", "merges",
                  "channels_removed", "ops_deleted", "noops_removed", "linear_ops_after", "critical_path_after",
                  "params_after", "flops_after", "max_abs_error", "max_rel_error", "approximation_error")


def _variant(report: FoldReport) -> dict:
    return copy.deepcopy({k: getattr(report, k) for k in VARIANT_FIELDS})


def _set_variant(report: FoldReport, values: dict) -> None:
    for k in VARIANT_FIELDS:
        setattr(report, k, copy.deepcopy(values[k]))


def _original_variant(report: FoldReport) -> dict:
    """The variant fields of the unchanged model: nothing removed, "after" = "before", exact."""
    return dict(rectifier_layers_removed=0, removed=[], approximated=[], batchnorms_fused=0, ops_merged=0, merges=[],
                channels_removed={}, ops_deleted=[], noops_removed=0, linear_ops_after=report.linear_ops_before,
                critical_path_after=report.critical_path_before, params_after=report.params_before,
                flops_after=report.flops_before, max_abs_error=0.0, max_rel_error=0.0, approximation_error={})


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
    """Conv/Linear calls in the graph (a border-corrected composed conv counts as one)."""
    return sum(1 for n in gm.graph.nodes
               if isinstance(_module(gm, n), algebra.LinearLike.__args__) or algebra.is_composed_conv(_module(gm, n)))


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


# ----- pass 0: eval no-ops ------------------------------------------------------------------------
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout)


def _is_noop(gm: fx.GraphModule, node: fx.Node) -> bool:
    if isinstance(_module(gm, node), PASS_THROUGH_MODULES):
        return True
    if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
        # traced in eval mode, the training flag is a constant False (F.dropout's default is True)
        training = node.kwargs.get("training", node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True))
        return training is False
    return False


def remove_noops(gm: fx.GraphModule, report: FoldReport) -> None:
    """Dropout (eval) and Identity are removed, so the linear ops around them become adjacent."""
    for node in list(gm.graph.nodes):
        if _is_noop(gm, node) and node.args and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            report.noops_removed += 1


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


def region_affine(rect: Rectifier, off: torch.Tensor, sat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        slope, offset = region_affine(rect, off, stats.always_saturated[name].cpu())
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
                    else _model_dtype(gm)
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


def _model_dtype(gm: fx.GraphModule) -> torch.dtype:
    param = next(gm.parameters(), None)
    return param.dtype if param is not None and param.is_floating_point() else torch.get_default_dtype()


def dead_neuron_producer(gm: fx.GraphModule, node: fx.Node, channels: int, channel_dim) -> fx.Node | None:
    """The Conv/Linear whose rows can absorb zeroing the always-OFF neurons of the ReLU at ``node``
    (it feeds only that ReLU, possibly through a BatchNorm that folding fuses into it), or None:
    then the ReLU stays as it is (``scenario.linearized`` asks the same question)."""
    producer = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    m = _module(gm, producer)
    if isinstance(m, BATCHNORM_MODULES) and _only_user(producer) is node and m.track_running_stats:
        inner = producer.args[0] if producer.args and isinstance(producer.args[0], fx.Node) else None
        if inner is not None and _only_user(inner) is producer:
            producer, node, m = inner, producer, _module(gm, inner)
    if (algebra.is_foldable(m) and _only_user(producer) is node and m.weight.shape[0] == channels
            and _same_channel_dim(m, channel_dim)):
        return producer
    return None


def _zero_dead_neurons(gm: fx.GraphModule, node: fx.Node, rect: Rectifier, off: torch.Tensor, channel_dim) -> None:
    """Always-OFF neurons of a ReLU/ReLU6 that stays output 0 on the data: make their input 0 too,
    so the constant-channel pass can delete them."""
    if not (rect.exact and rect.off_slope == 0.0) or not bool(off.any()):
        return
    producer = dead_neuron_producer(gm, node, off.numel(), channel_dim)
    if producer is not None:
        keep = (~off).to(torch.float64)
        algebra.scale_output_channels_(_module(gm, producer), keep, torch.zeros_like(keep))


# ----- pass 2b: emptied ops ------------------------------------------------------------------------
def _conv_geometry(m: nn.Module) -> list[list[int]] | None:
    if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or isinstance(m.padding, str) \
            or any(d != 1 for d in m.dilation):
        return None
    return [[k, s, p] for k, s, p in zip(m.kernel_size, m.stride, m.padding)]


def _pool_geometry(m: nn.Module) -> list[list[int]] | None:
    if not isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)) or m.ceil_mode \
            or getattr(m, "dilation", 1) not in (1, (1, 1)):
        return None
    dims = 1 if isinstance(m, (nn.MaxPool1d, nn.AvgPool1d)) else 2
    as_tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims  # noqa: E731
    stride = m.stride if m.stride is not None else m.kernel_size
    return [[k, s, p] for k, s, p in zip(as_tuple(m.kernel_size), as_tuple(stride), as_tuple(m.padding))]


def _elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that keep the shape of their only tensor input (the chain walk passes through them)."""
    m = _module(gm, node)
    if m is not None:
        return (isinstance(m, BATCHNORM_MODULES + (algebra.ChannelAffine, algebra.ChannelOffset))
                or rectifier_of_module(m) is not None)
    return rectifier_of_call(node.op, node.target, node.args, node.kwargs) is not None


def _shape_source(gm: fx.GraphModule, node: fx.Node, linear: bool) -> tuple[fx.Node, list]:
    """The nearest tensor that is computed anyway and gives the shape of ``node``, and the conv /
    pool geometry from it to ``node``: everything in between is only used to feed an emptied op."""
    geometry: list = []
    cur = node
    while cur.op != "placeholder" and len(cur.users) == 1 and cur.args and isinstance(cur.args[0], fx.Node):
        if _is_inplace(gm, cur) and len(cur.args[0].users) > 1:
            break  # what it writes into its input is read elsewhere: it must stay computed
        m = _module(gm, cur)
        if _elementwise(gm, cur) and len(cur.all_input_nodes) == 1:
            pass
        elif linear and isinstance(m, nn.Linear):
            pass
        elif not linear and m is not None and (_conv_geometry(m) or _pool_geometry(m)):
            geometry.insert(0, _conv_geometry(m) or _pool_geometry(m))
        elif isinstance(m, algebra.ConstantChannels) and (m.channel_dim == -1) == linear:
            geometry[:0] = m.geometry  # an emptied op before this one: read its source instead
        else:
            break
        cur = cur.args[0]
    return cur, geometry


def _constant_through(gm: fx.GraphModule, user: fx.Node, node: fx.Node, const: algebra.ConstantChannels):
    """(value, geometry) of ``user`` applied to the constant ``node``, or None when the result is
    not a per-channel constant (e.g. a zero-padded conv sees the constant only inside the border)."""
    if not (user.args and user.args[0] is node and len(user.all_input_nodes) == 1):
        return None
    m = _module(gm, user)
    shape = [1, -1] + [1] * (len(const.geometry[-1]) if const.channel_dim == 1 and const.geometry else 0)
    value = const.value.clone().view(shape)  # a clone: inplace rectifiers must not touch the buffer
    geometry = const.geometry
    if _elementwise(gm, user):
        if isinstance(m, (algebra.ChannelAffine, algebra.ChannelOffset)) and m.channel_dim != const.channel_dim:
            return None  # per-channel along another dim (e.g. tokens vs features)
        if isinstance(m, BATCHNORM_MODULES) and const.channel_dim != 1:
            return None  # BatchNorm1d on (N, T, D) normalises dim 1, not the constant's features
        if m is not None:
            value = m(value)
        elif user.op == "call_method":
            value = getattr(value, user.target)(*user.args[1:], **user.kwargs)
        else:
            value = user.target(value, *user.args[1:], **user.kwargs)
    elif isinstance(m, nn.Linear) and const.channel_dim == -1:
        value = m(value)
    elif (const.channel_dim == 1 and const.geometry and _conv_geometry(m) is not None
          and len(_conv_geometry(m)) == len(const.geometry[-1]) and all(p == 0 for _, _, p in _conv_geometry(m))):
        w = algebra.dense_weight64(m)  # unpadded: every output sees the constant through the whole kernel
        b = m.bias.detach().double() if m.bias is not None else w.new_zeros(w.shape[0])
        value = (w.flatten(2).sum(2) @ const.value.double() + b).to(const.value.dtype)
        geometry = geometry + [_conv_geometry(m)]
    else:
        return None
    return value.flatten(), geometry


def _propagate_constant(gm: fx.GraphModule, node: fx.Node, const: algebra.ConstantChannels,
                        report: FoldReport) -> None:
    """Ops applied to a per-channel constant that give one again (rectifiers, BN, Linear, unpadded
    convs) are evaluated once; the constant moves down the graph."""
    for user in list(node.users):
        through = _constant_through(gm, user, node, const)
        if through is None:
            continue
        new = algebra.ConstantChannels(through[0], const.channel_dim, through[1])
        if user.op == "call_module" and isinstance(gm.get_submodule(user.target), algebra.LinearLike.__args__):
            report.ops_deleted.append(user.target)
        target = f"{user.name}_constant"
        gm.add_submodule(target, new)
        with gm.graph.inserting_after(user):
            new_node = gm.graph.call_module(target, node.args)
        user.replace_all_uses_with(new_node)
        gm.graph.erase_node(user)
        _propagate_constant(gm, new_node, new, report)


def absorb_constant_addends(gm: fx.GraphModule) -> bool:
    """``m(y) + c`` with a per-channel constant c: add c to m's bias. ``c += x`` becomes ``x + c``
    (the constant is an expanded view, which cannot be written in place). True if any changed."""
    changed = False
    for node in list(gm.graph.nodes):
        const = _module(gm, node)
        if not isinstance(const, algebra.ConstantChannels):
            continue
        for user in list(node.users):
            if not (user.op == "call_function" and user.target in ADD_FUNCTIONS and len(user.args) == 2
                    and not user.kwargs):
                continue
            other = user.args[1] if user.args[0] is node else user.args[0]
            m = _module(gm, other)
            # `other` may also be the constant's shape source: that use dies with the addition
            if (isinstance(other, fx.Node) and algebra.is_foldable(m) and set(other.users) <= {user, node}
                    and m.weight.shape[0] == const.value.numel()
                    and const.channel_dim == (-1 if isinstance(m, nn.Linear) else 1)):
                algebra.add_to_bias_(m, const.value)
                user.replace_all_uses_with(other)
                gm.graph.erase_node(user)
                changed = True
            elif user.target is operator.iadd and user.args[0] is node:
                user.target = operator.add
                user.args = (user.args[1], node)
    _eliminate_dead_code(gm)
    return changed


def _size_preserving(geometry: list) -> bool:
    """Whether convs / pools of this geometry keep every spatial size (stride 1, padding (k-1)/2)."""
    return all(s == 1 and 2 * p == k - 1 for step in geometry for k, s, p in step)


def _offset_of_addition(gm: fx.GraphModule, node: fx.Node):
    """``(x, const node, constant)`` when ``node`` is ``x + c`` (or ``c + x``) with c a per-channel
    constant shaped like x for every input (its shape source is x itself, through size-preserving
    geometry): then ``x + c`` is ``x + offset`` broadcast along c's channel dim. Else None."""
    adds = (node.op == "call_function" and node.target in ADD_FUNCTIONS) or (node.op == "call_method"
                                                                            and node.target == "add")
    if not (adds and len(node.args) == 2 and not node.kwargs):
        return None
    for x, c in (node.args, node.args[::-1]):
        const = _module(gm, c)
        if not (isinstance(const, algebra.ConstantChannels) and isinstance(x, fx.Node) and c.args
                and c.args[0] is x and c is not x):
            continue
        if const.channel_dim == 1 and not _size_preserving(const.geometry):
            continue
        if node.target is operator.iadd and (x is not node.args[0] or not set(x.users) <= {node, c}):
            continue  # `x += c` writes into x: only rewritten when nothing else reads x
        return x, c, const
    return None


def collapse_constant_additions(gm: fx.GraphModule) -> bool:
    """Constant additions collapse into as few ops as possible (never adds work):

    * ``x + c`` with c a per-channel constant shaped like x becomes ``ChannelOffset(c)(x)``;
    * ``(x + c1) + c2`` -> ``x + (c1 + c2)``, and an offset after a ``ChannelAffine`` joins its offset;
    * ``m(y) + c`` with m a Conv/Linear feeding only the addition: c goes into m's bias;
    * ``m(x + c)`` with m a Linear or an unpadded conv: ``m(x)`` with b += Σ W·c.

    True if the graph changed."""
    changed = False
    for node in list(gm.graph.nodes):
        found = _offset_of_addition(gm, node)
        if found is None:
            continue
        x, c, const = found
        target = f"{node.name}_offset"
        gm.add_submodule(target, algebra.ChannelOffset(const.value.clone(), const.channel_dim))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(target, (x,))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        if not c.users:
            gm.graph.erase_node(c)
        changed = True
    while _absorb_offsets(gm):
        changed = True
    return changed


def _absorb_offsets(gm: fx.GraphModule) -> bool:
    for node in list(gm.graph.nodes):
        off = _module(gm, node)
        if not isinstance(off, algebra.ChannelOffset) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        x = node.args[0]
        prev = _module(gm, x)
        channels, dim = off.offset.numel(), off.channel_dim
        if _only_user(x) is node and (prev is None or _called_once(gm, x)):
            if isinstance(prev, algebra.ChannelOffset) and prev.channel_dim == dim and prev.offset.numel() == channels:
                total = prev.offset.double() + off.offset.double()
                prev.offset = total.to(prev.offset.dtype)
                node.replace_all_uses_with(x)
                gm.graph.erase_node(node)
                return True
            if isinstance(prev, algebra.ChannelAffine) and prev.channel_dim == dim and prev.offset.numel() == channels:
                prev.offset = (prev.offset.double() + off.offset.double()).to(prev.offset.dtype)
                node.replace_all_uses_with(x)
                gm.graph.erase_node(node)
                return True
            if (_linear_op(prev) and prev.weight.shape[0] == channels
                    and dim == (-1 if isinstance(prev, nn.Linear) else 1)):
                algebra.add_to_bias_(prev, off.offset)
                node.replace_all_uses_with(x)
                gm.graph.erase_node(node)
                return True
        user = _only_user(node)
        m = _module(gm, user) if user is not None else None
        if (m is not None and user.args and user.args[0] is node and len(user.all_input_nodes) == 1
                and algebra.absorbs_input_offset(m, channels, dim) and _called_once(gm, user)):
            algebra.absorb_input_offset_(m, off.offset)
            user.args = (x,) + tuple(user.args[1:])
            gm.graph.erase_node(node)
            return True
    return False


def _called_once(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the module ``node`` calls is called nowhere else in the graph (editing it is local)."""
    return node.op == "call_module" and sum(
        1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target) == 1


def delete_empty_ops(gm: fx.GraphModule, report: FoldReport) -> None:
    """A Conv/Linear whose weights are all zero (pruning emptied it) outputs its bias whatever its
    input: replace it by that constant and let the ops that only fed it die."""
    for node in list(gm.graph.nodes):
        m = _module(gm, node)
        if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) or not node.args \
                or not isinstance(node.args[0], fx.Node) or bool(m.weight.detach().any()):
            continue
        linear = isinstance(m, nn.Linear)
        if not linear and _conv_geometry(m) is None:
            continue
        source, geometry = _shape_source(gm, node.args[0], linear)
        if not linear:
            geometry.append(_conv_geometry(m))
        bias = m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.weight.shape[0])
        const = algebra.ConstantChannels(bias, -1 if linear else 1, geometry)
        _set_module(gm, node.target, const)
        node.args = (source,)
        report.ops_deleted.append(node.target)
        _propagate_constant(gm, node, const, report)
    _eliminate_dead_code(gm)  # the ops that only fed an emptied op stop counting as users
    absorb_constant_addends(gm)


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
        if getattr(prod, "groups", 1) != 1 or getattr(cons, "groups", 1) != 1:
            continue  # dropping channels would break the groups' structure
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
def _note_blocked(report: FoldReport, key: str, reason: str) -> None:
    if not any(s["node"] == key for s in report.skipped):
        _skip(report, False, key, reason)  # a merge not done is never an error


def _erase(gm: fx.GraphModule, *nodes: fx.Node) -> None:
    for node in nodes:
        gm.graph.erase_node(node)


def _linear_op(m: nn.Module | None) -> bool:
    """Linear ops a skip or a parallel branch can be added into (composed convs included)."""
    return algebra.is_foldable(m) or algebra.is_composed_conv(m)


def _skip_candidates(gm: fx.GraphModule, node: fx.Node, report: FoldReport):
    """``x + m(x)`` -> one op (identity added into m), and ``a(x) + b(x)`` -> one op."""
    if not (node.op == "call_function" and node.target in ADD_FUNCTIONS and len(node.args) == 2 and not node.kwargs):
        return
    a, b = node.args
    for skip, body in ((a, b), (b, a)):
        m = _module(gm, body)
        if _linear_op(m) and _only_user(body) is node and body.args and body.args[0] is skip:
            reason = algebra.identity_blocker(m)
            if reason:
                _note_blocked(report, f"skip + {body.target}", reason)
                continue

            def apply(merged, body=body):
                _set_module(gm, body.target, merged)
                node.replace_all_uses_with(body)
                _erase(gm, node)

            yield Candidate(f"skip + {body.target}", skip, lambda x, m=m: x + m(x),
                            lambda m=m: algebra.add_identity(m), apply, ops=(m,), kind="skip")
    ma, mb = _module(gm, a), _module(gm, b)
    if (_linear_op(ma) and _linear_op(mb) and a is not b and _only_user(a) is node
            and _only_user(b) is node and a.args and b.args and a.args[0] is b.args[0]):
        key = f"{a.target} + {b.target}"
        reason = algebra.branches_blocker(ma, mb)
        if reason:
            _note_blocked(report, key, reason)
            return

        def apply(merged):
            _set_module(gm, a.target, merged)
            node.replace_all_uses_with(a)
            _erase(gm, node, b)

        yield Candidate(key, a.args[0], lambda x: ma(x) + mb(x), lambda: algebra.merge_branches(ma, mb), apply,
                        ops=(ma, mb), kind="branches")


def _chain_candidate(gm: fx.GraphModule, node: fx.Node, report: FoldReport):
    """``second(first(x))`` -> one op."""
    second = _module(gm, node)
    if not isinstance(second, algebra.LINEAR_MODULES) or not node.args or not isinstance(node.args[0], fx.Node):
        return
    prev = node.args[0]
    first = _module(gm, prev)
    if not isinstance(first, algebra.LINEAR_MODULES) or _only_user(prev) is not node or not prev.args:
        return
    if not (algebra.is_foldable(first) and algebra.is_foldable(second)):
        _note_blocked(report, f"{prev.target} -> {node.target}", algebra.conv_merge_blocker(first, second)
                      or "only Linear, Conv1d and Conv2d are merged")
        return
    key = f"{prev.target} + {node.target}"
    corrected = False
    if isinstance(first, nn.Linear) and isinstance(second, nn.Linear):
        build = lambda: algebra.merge_linear_linear(first, second)  # noqa: E731
    elif isinstance(first, nn.Linear) or isinstance(second, nn.Linear):
        return
    else:
        reason = border.merge_padded_blocker(first, second)
        if reason:
            _note_blocked(report, f"{prev.target} -> {node.target}", reason)
            return
        build = lambda: border.merge_padded(first, second)  # noqa: E731
        # a zero-padding second conv makes the merge exact only with a border correction
        corrected = algebra.conv_merge_blocker(first, second) is not None

    def apply(merged):
        _set_module(gm, node.target, merged)
        node.args = (prev.args[0],) + tuple(node.args[1:])
        _erase(gm, prev)

    yield Candidate(key, prev.args[0], lambda x: second(first(x)), build, apply,
                    corrected=not isinstance(first, nn.Linear) and corrected, ops=(first, second), kind="chain",
                    groups=lambda: _chain_groups(gm, prev, node))


_MAX_CHAIN = 6  # ops in a chain the planner looks ahead through


def _merge_pair(first: nn.Module, second: nn.Module) -> nn.Module | None:
    """``second(first(x))`` as one op, as a chain merge makes it, or None when it cannot be."""
    if not (algebra.is_foldable(first) and algebra.is_foldable(second)):
        return None
    if isinstance(first, nn.Linear) and isinstance(second, nn.Linear):
        return algebra.merge_linear_linear(first, second) if first.out_features == second.in_features else None
    if isinstance(first, nn.Linear) or isinstance(second, nn.Linear) or border.merge_padded_blocker(first, second):
        return None
    return border.merge_padded(first, second)


def _chain_groups(gm: fx.GraphModule, prev: fx.Node, node: fx.Node):
    """Longer chains of Conv/Linear ops (each feeding only the next) around the candidate
    ``node(prev(x))``, shortest first, as ``(key, input node, unmerged fn, build)``: a merge with more
    FLOPs can be the first step of a chain whose full merge has fewer (MobileNetV2's expand →
    depthwise → project, once its activations are linear)."""
    nodes = [prev, node]
    while len(nodes) < _MAX_CHAIN:
        head = nodes[0]
        inp = head.args[0] if head.args and isinstance(head.args[0], fx.Node) else None
        if inp is None or not algebra.is_foldable(_module(gm, inp)) or _only_user(inp) is not head or not inp.args:
            break
        nodes.insert(0, inp)
    while len(nodes) < _MAX_CHAIN:
        tail = nodes[-1]
        user = _only_user(tail)
        if (user is None or not algebra.is_foldable(_module(gm, user)) or not user.args or user.args[0] is not tail
                or len(user.all_input_nodes) != 1):
            break
        nodes.append(user)
    a, b = nodes.index(prev), nodes.index(node)
    windows = sorted(((i, j) for i in range(a + 1) for j in range(b, len(nodes)) if j - i >= 2),
                     key=lambda w: (w[1] - w[0], w[0]))
    for i, j in windows:
        ops = [_module(gm, n) for n in nodes[i:j + 1]]

        def unmerged(x, ops=ops):
            for op in ops:
                x = op(x)
            return x

        def build(ops=ops):
            merged = ops[-1]
            for op in reversed(ops[:-1]):
                if merged is not ops[-1] and not algebra.is_foldable(merged):
                    return None  # a border-corrected conv composes no further
                merged = _merge_pair(op, merged)
                if merged is None:
                    return None
            return merged

        yield " -> ".join(str(n.target) for n in nodes[i:j + 1]), nodes[i].args[0], unmerged, build


def _candidates(gm: fx.GraphModule, report: FoldReport):
    for node in gm.graph.nodes:
        yield from _skip_candidates(gm, node, report)
        yield from _chain_candidate(gm, node, report)


def merge_linear_ops(gm: fx.GraphModule, report: FoldReport, planner: Planner) -> None:
    """Make the exact merges the planner accepts, until none is left (each merge can expose another)."""
    if not planner.merges:
        return
    rejected: set[str] = set()

    def merge_one(corrected: bool) -> bool:
        for candidate in _candidates(gm, report):
            if candidate.key in rejected or candidate.corrected != corrected:
                continue
            merged = candidate.build()
            if not planner.accept(candidate, merged):
                rejected.add(candidate.key)
                continue
            candidate.apply(merged)
            report.ops_merged += 1
            report.merges.append(candidate.key)
            return True
        return False

    # plain merges first: a border-corrected conv composes no further, so e.g. in an inverted
    # residual the depthwise and projection convs merge before the expansion conv joins them
    while merge_one(False) or merge_one(True):
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


def _approximation_errors(gm: fx.GraphModule, sites: list[Site], stats: EntropyStats, args: tuple) -> dict:
    """For each GELU/SiLU/Hardswish about to be linearized: how far the linear map is from the
    activation on the example input (the replacement is approximate by nature; SPEC §4.4)."""
    chosen = [s for s in sites if not s.rectifier.exact and s.name in stats.histogram and stats.linearizable(s.name)]
    wanted = {s.node.args[0] for s in chosen if s.node.args and isinstance(s.node.args[0], fx.Node)}
    if not wanted:
        return {}
    captured: dict[fx.Node, torch.Tensor] = {}

    class _Capture(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted and isinstance(out, torch.Tensor):
                captured[n] = out.detach().to(torch.float64, copy=True)  # a copy: an inplace activation follows
            return out

    _Capture(gm).run(*args)
    errors = {}
    for site in chosen:
        z = captured.get(site.node.args[0])
        if z is None or z.numel() == 0:
            continue
        slope, offset = region_affine(site.rectifier, stats.always_off[site.name].cpu(),
                                       stats.always_saturated[site.name].cpu())
        dim = stats.sites[site.name].channel_dim % z.dim()
        shape = [1] * z.dim()
        shape[dim] = -1
        phi = site.rectifier.apply(z)
        err = (phi - (z * slope.to(z.device).view(shape) + offset.to(z.device).view(shape))).abs()
        scale = float(phi.abs().max())
        errors[site.name] = {"max_abs": float(err.max()), "mean_abs": float(err.mean()),
                             "max_rel": float(err.max()) / scale if scale > 0 else float(err.max())}
    return errors


def _planner_of(planner, merge: bool, threads: int | None, budget_s: float | None) -> Planner:
    if isinstance(planner, Planner):
        return planner
    return Planner("none" if not merge else planner, threads=threads, budget_s=budget_s)


def _as_args(inputs) -> tuple:
    return inputs if isinstance(inputs, tuple) else (inputs,)


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
    merge: bool = True,
    strict: bool = False,
    verify: bool = True,
    tolerance: float = 1e-5,
) -> nn.Module:
    """A shallower copy of ``model`` with its zero-entropy rectifiers folded away (SPEC §4).

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
    * ``"all"``: every exact merge (the shallowest graph; no timing). ``"none"`` (or
      ``merge=False``): no merges. Both return the fold without a whole-model check.

    A :class:`~nepenthe.fold.planner.Planner` instance may be passed instead (its own budget,
    margin, threads, timer and clock; its timing cache is kept across the folds it plans).

    ``latency_input`` is the **deployment batch**: the tensor(s) the latency planner times on, on
    the device you will run on. Default: the first sample of ``example_input`` (batch 1) — the
    latency case, and the cheapest to time; ``example_input`` is typically a calibration batch
    (hundreds of samples), whose timings favour other merges than a deployment at batch 1 and
    cost the planner more. Pass a batch of your serving batch size to plan for throughput.
    ``threads`` fixes the CPU threads of the timings.
    """
    started = time.perf_counter()
    if not isinstance(stats, EntropyStats):
        raise TypeError(f"stats must be the EntropyStats of nepenthe.measure(model, data), got {type(stats).__name__}")
    plan = _planner_of(planner, merge, threads, budget_s)
    plan.start()
    args = _as_args(example_input)
    timing_args = _first_sample(args) if latency_input is None else _as_args(latency_input)
    param = next(model.parameters(), None)
    if param is not None:  # timed where the model lives
        timing_args = tuple(a.to(param.device) if isinstance(a, torch.Tensor) else a for a in timing_args)
    was_training = model.training
    model.eval()
    try:
        reference = _first_tensor(model(*args)) if verify else None  # what _verify compares with
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
                        params_before=_params(gm), flops_before=count_flops(gm, args))
    if approximate:
        report.approximation_error = _approximation_errors(gm, sites, stats, args)
    remove_noops(gm, report)
    fuse_batchnorm(gm, report)
    linearize_rectifiers(gm, sites, stats, report, approximate, strict)
    delete_empty_ops(gm, report)
    remove_constant_channels(gm, report)
    collapse_constant_additions(gm)
    unmerged = None
    if plan.mode == "latency":
        t0 = time.perf_counter()
        _recompile(gm)
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
    _recompile(gm)
    report.linear_ops_after = count_linear_ops(gm)
    report.critical_path_after = critical_path(gm)
    report.params_after = _params(gm)
    report.flops_after = count_flops(gm, args)
    if verify:
        _verify(gm, args, reference, report, strict, tolerance)


def _eliminate_dead_code(gm: fx.GraphModule) -> None:
    """fx's dead-code elimination, keeping inplace ops: their result may be unused while what they
    wrote into their input is read (``relu_(x); ... + x``)."""
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or (
        n.op in ("call_module", "call_function", "call_method") and _is_inplace(gm, n)))


def _recompile(gm: fx.GraphModule) -> None:
    _eliminate_dead_code(gm)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()


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
        report.discarded["folded"] = {**_variant(report), "reason": "nothing was removed, merged or deleted"}
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
            report.discarded["folded"] = {**_variant(report), "reason": f"{why}: {_describe(c)}"}
            candidate, base_report = unmerged
            name = "folded_no_merges"
            _finish(candidate, args, reference, base_report, check["strict"], check["tolerance"], check["verify"])
            _set_variant(report, _variant(base_report))
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
        report.discarded[name] = {**_variant(report), "reason": f"clearly slower than the original: {_describe(c)}"}
        return _original(model, report, f"every fold measured clearly slower than the original ({_describe(c)})")
    finally:
        model.train(was_training)


def _original(model: nn.Module, report: FoldReport, reason: str) -> nn.Module:
    report.returned, report.returned_reason = "original", reason
    _set_variant(report, _original_variant(report))
    return remove_masks(copy.deepcopy(model)).eval()
