"""Pass 2b: emptied Conv/Linear ops become their constant output, which moves down the graph
through the ops that keep it per-channel; constant additions collapse into one offset
absorbed into a neighbouring bias where exact."""

from __future__ import annotations

import operator

import torch.fx as fx
import torch.nn as nn

from ..._utils import set_submodule
from ...activations import ADD_FUNCTIONS, BATCHNORM_MODULES, rectifier_of_call, rectifier_of_module
from .. import algebra, modules
from .._fx import (
    called_once,
    conv_geometry,
    eliminate_dead_code,
    is_inplace,
    linear_op,
    module_of,
    only_user,
    pool_geometry,
)
from ..report import FoldReport

__all__ = ["absorb_constant_addends", "collapse_constant_additions", "delete_empty_ops"]


def _elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that keep the shape of their only tensor input (the chain walk passes through them)."""
    m = module_of(gm, node)
    if m is not None:
        return (isinstance(m, BATCHNORM_MODULES + (modules.ChannelAffine, modules.ChannelOffset))
                or rectifier_of_module(m) is not None)
    return rectifier_of_call(node.op, node.target, node.args, node.kwargs) is not None


def _shape_source(gm: fx.GraphModule, node: fx.Node, linear: bool) -> tuple[fx.Node, list]:
    """The nearest tensor that is computed anyway and gives the shape of ``node``, and the conv /
    pool geometry from it to ``node``: everything in between is only used to feed an emptied op."""
    geometry: list = []
    cur = node
    while cur.op != "placeholder" and len(cur.users) == 1 and cur.args and isinstance(cur.args[0], fx.Node):
        if is_inplace(gm, cur) and len(cur.args[0].users) > 1:
            break  # what it writes into its input is read elsewhere: it must stay computed
        m = module_of(gm, cur)
        if _elementwise(gm, cur) and len(cur.all_input_nodes) == 1:
            pass
        elif linear and isinstance(m, nn.Linear):
            pass
        elif not linear and m is not None and (conv_geometry(m) or pool_geometry(m)):
            geometry.insert(0, conv_geometry(m) or pool_geometry(m))
        elif isinstance(m, modules.ConstantChannels) and (m.channel_dim == -1) == linear:
            geometry[:0] = m.geometry  # an emptied op before this one: read its source instead
        else:
            break
        cur = cur.args[0]
    return cur, geometry


def _constant_through(gm: fx.GraphModule, user: fx.Node, node: fx.Node, const: modules.ConstantChannels):
    """(value, geometry) of ``user`` applied to the constant ``node``, or None when the result is
    not a per-channel constant (e.g. a zero-padded conv sees the constant only inside the border)."""
    if not (user.args and user.args[0] is node and len(user.all_input_nodes) == 1):
        return None
    m = module_of(gm, user)
    shape = [1, -1] + [1] * (len(const.geometry[-1]) if const.channel_dim == 1 and const.geometry else 0)
    value = const.value.clone().view(shape)  # a clone: inplace rectifiers must not touch the buffer
    geometry = const.geometry
    if _elementwise(gm, user):
        if isinstance(m, (modules.ChannelAffine, modules.ChannelOffset)) and m.channel_dim != const.channel_dim:
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
    elif (const.channel_dim == 1 and const.geometry and conv_geometry(m) is not None
          and len(conv_geometry(m)) == len(const.geometry[-1]) and all(p == 0 for _, _, p in conv_geometry(m))):
        w = algebra.dense_weight64(m)  # unpadded: every output sees the constant through the whole kernel
        b = m.bias.detach().double() if m.bias is not None else w.new_zeros(w.shape[0])
        value = (w.flatten(2).sum(2) @ const.value.double() + b).to(const.value.dtype)
        geometry = geometry + [conv_geometry(m)]
    else:
        return None
    return value.flatten(), geometry


def _propagate_constant(gm: fx.GraphModule, node: fx.Node, const: modules.ConstantChannels,
                        report: FoldReport) -> None:
    """Ops applied to a per-channel constant that give one again (rectifiers, BN, Linear, unpadded
    convs) are evaluated once; the constant moves down the graph."""
    for user in list(node.users):
        through = _constant_through(gm, user, node, const)
        if through is None:
            continue
        new = modules.ConstantChannels(through[0], const.channel_dim, through[1])
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
        const = module_of(gm, node)
        if not isinstance(const, modules.ConstantChannels):
            continue
        for user in list(node.users):
            if not (user.op == "call_function" and user.target in ADD_FUNCTIONS and len(user.args) == 2
                    and not user.kwargs):
                continue
            other = user.args[1] if user.args[0] is node else user.args[0]
            m = module_of(gm, other)
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
    eliminate_dead_code(gm)
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
        const = module_of(gm, c)
        if not (isinstance(const, modules.ConstantChannels) and isinstance(x, fx.Node) and c.args
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
        gm.add_submodule(target, modules.ChannelOffset(const.value.clone(), const.channel_dim))
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
        off = module_of(gm, node)
        if not isinstance(off, modules.ChannelOffset) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        x = node.args[0]
        prev = module_of(gm, x)
        channels, dim = off.offset.numel(), off.channel_dim
        if only_user(x) is node and (prev is None or called_once(gm, x)):
            if isinstance(prev, modules.ChannelOffset) and prev.channel_dim == dim and prev.offset.numel() == channels:
                total = prev.offset.double() + off.offset.double()
                prev.offset = total.to(prev.offset.dtype)
                node.replace_all_uses_with(x)
                gm.graph.erase_node(node)
                return True
            if isinstance(prev, modules.ChannelAffine) and prev.channel_dim == dim and prev.offset.numel() == channels:
                prev.offset = (prev.offset.double() + off.offset.double()).to(prev.offset.dtype)
                node.replace_all_uses_with(x)
                gm.graph.erase_node(node)
                return True
            if (linear_op(prev) and prev.weight.shape[0] == channels
                    and dim == (-1 if isinstance(prev, nn.Linear) else 1)):
                algebra.add_to_bias_(prev, off.offset)
                node.replace_all_uses_with(x)
                gm.graph.erase_node(node)
                return True
        user = only_user(node)
        m = module_of(gm, user) if user is not None else None
        if (m is not None and user.args and user.args[0] is node and len(user.all_input_nodes) == 1
                and algebra.absorbs_input_offset(m, channels, dim) and called_once(gm, user)):
            algebra.absorb_input_offset_(m, off.offset)
            user.args = (x,) + tuple(user.args[1:])
            gm.graph.erase_node(node)
            return True
    return False


def delete_empty_ops(gm: fx.GraphModule, report: FoldReport) -> None:
    """A Conv/Linear whose weights are all zero (pruning emptied it) outputs its bias whatever its
    input: replace it by that constant and let the ops that only fed it die."""
    for node in list(gm.graph.nodes):
        m = module_of(gm, node)
        if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) or not node.args \
                or not isinstance(node.args[0], fx.Node) or bool(m.weight.detach().any()):
            continue
        linear = isinstance(m, nn.Linear)
        if not linear and conv_geometry(m) is None:
            continue
        source, geometry = _shape_source(gm, node.args[0], linear)
        if not linear:
            geometry.append(conv_geometry(m))
        bias = m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.weight.shape[0])
        const = modules.ConstantChannels(bias, -1 if linear else 1, geometry)
        set_submodule(gm, node.target, const)
        node.args = (source,)
        report.ops_deleted.append(node.target)
        _propagate_constant(gm, node, const, report)
    eliminate_dead_code(gm)  # the ops that only fed an emptied op stop counting as users
    absorb_constant_addends(gm)
