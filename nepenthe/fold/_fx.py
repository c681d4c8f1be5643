"""Small torch.fx helpers shared by the folding passes (module of a node, its only user,
inplace calls, conv/pool geometry, dead-code elimination that keeps inplace ops)."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ..activations import Rectifier, rectifier_of_call, rectifier_of_module
from . import algebra


def module_of(gm: fx.GraphModule, node) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        return gm.get_submodule(node.target)
    return None


def only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def same_channel_dim(m: nn.Module, channel_dim: int | None) -> bool:
    """Whether the rectifier's neurons are the module's output channels (None: unknown, assumed)."""
    return channel_dim is None or channel_dim == (-1 if isinstance(m, nn.Linear) else 1)


def is_inplace(gm: fx.GraphModule, node: fx.Node) -> bool:
    m = module_of(gm, node)
    if m is not None:
        return bool(getattr(m, "inplace", False))
    target = node.target
    return bool(node.kwargs.get("inplace")) or target in ("relu_",) or getattr(target, "__name__", "").endswith("_")


def model_dtype(gm: fx.GraphModule) -> torch.dtype:
    param = next(gm.parameters(), None)
    return param.dtype if param is not None and param.is_floating_point() else torch.get_default_dtype()


def erase(gm: fx.GraphModule, *nodes: fx.Node) -> None:
    for node in nodes:
        gm.graph.erase_node(node)


def called_once(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the module ``node`` calls is called nowhere else in the graph (editing it is local)."""
    return node.op == "call_module" and sum(
        1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target) == 1


def rectifier_at(gm: fx.GraphModule, node: fx.Node) -> Rectifier | None:
    m = module_of(gm, node)
    if m is not None:
        return rectifier_of_module(m)
    return rectifier_of_call(node.op, node.target, node.args, node.kwargs)


def linear_op(m: nn.Module | None) -> bool:
    """Linear ops a skip or a parallel branch can be added into (composed convs included)."""
    return algebra.is_foldable(m) or algebra.is_composed_conv(m)


def conv_geometry(m: nn.Module) -> list[list[int]] | None:
    if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or isinstance(m.padding, str) \
            or any(d != 1 for d in m.dilation):
        return None
    return [[k, s, p] for k, s, p in zip(m.kernel_size, m.stride, m.padding)]


def pool_geometry(m: nn.Module) -> list[list[int]] | None:
    if not isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)) or m.ceil_mode \
            or getattr(m, "dilation", 1) not in (1, (1, 1)):
        return None
    dims = 1 if isinstance(m, (nn.MaxPool1d, nn.AvgPool1d)) else 2
    as_tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims  # noqa: E731
    stride = m.stride if m.stride is not None else m.kernel_size
    return [[k, s, p] for k, s, p in zip(as_tuple(m.kernel_size), as_tuple(stride), as_tuple(m.padding))]


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """fx's dead-code elimination, keeping inplace ops: their result may be unused while what they
    wrote into their input is read (``relu_(x); ... + x``)."""
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or (
        n.op in ("call_module", "call_function", "call_method") and is_inplace(gm, n)))


def recompile(gm: fx.GraphModule) -> None:
    eliminate_dead_code(gm)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
