"""Pass 0 and 1: eval no-ops (Dropout, Identity) are removed and BatchNorm is fused into the
Conv/Linear before it, so linear ops become adjacent."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..._utils import set_submodule
from ...activations import BATCHNORM_MODULES, PASS_THROUGH_MODULES
from .._fx import module_of, only_user
from ..report import FoldReport

__all__ = ["fuse_batchnorm", "remove_noops"]

_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout)


def _is_noop(gm: fx.GraphModule, node: fx.Node) -> bool:
    if isinstance(module_of(gm, node), PASS_THROUGH_MODULES):
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


def fuse_batchnorm(gm: fx.GraphModule, report: FoldReport) -> None:
    for node in list(gm.graph.nodes):
        bn = module_of(gm, node)
        if not isinstance(bn, BATCHNORM_MODULES) or not node.args:
            continue
        producer = node.args[0]
        conv = module_of(gm, producer)
        if conv is None or only_user(producer) is not node or not bn.track_running_stats:
            continue
        if isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            fused = fuse_conv_bn_eval(conv, bn)
        elif isinstance(conv, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
            fused = fuse_linear_bn_eval(conv, bn)
        else:
            continue
        set_submodule(gm, producer.target, fused)
        node.replace_all_uses_with(producer)
        gm.graph.erase_node(node)
        report.batchnorms_fused += 1
