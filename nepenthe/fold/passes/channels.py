"""Pass 3: constant channels (a producer row with zero weights) are deleted from the producer
and its consumer; a non-zero constant goes into the consumer's bias where exact."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ..._utils import set_submodule
from .. import algebra
from .._fx import module_of, only_user, rectifier_at
from ..report import FoldReport

__all__ = ["remove_constant_channels"]


def remove_constant_channels(gm: fx.GraphModule, report: FoldReport) -> None:
    for node in list(gm.graph.nodes):
        prod = module_of(gm, node)
        if not algebra.is_foldable(prod):
            continue
        user = only_user(node)
        if user is None:
            continue
        rect = rectifier_at(gm, user)
        consumer_node = only_user(user) if rect is not None else user
        cons = module_of(gm, consumer_node) if consumer_node is not None else None
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
        set_submodule(gm, node.target, algebra.select_output_channels(prod, keep))
        set_submodule(gm, consumer_node.target, algebra.select_input_channels(cons, keep))
        report.channels_removed[node.target] = report.channels_removed.get(node.target, 0) + int(removable.sum())
