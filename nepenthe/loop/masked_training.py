"""Training with masks: keeping a model's ``*_mask`` buffers enforced by any optimizer, or by the
fused masked optimizers of :mod:`nepenthe.ops` (the bridge between the mask storage of
:mod:`nepenthe.masks` and the ops layer)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from .. import ops
from ..masks import mask_lookup, masked_parameters

__all__ = ["enforce_masks", "keep_masks_after_steps", "masked_optimizer"]


@torch.no_grad()
def enforce_masks(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Zero every masked parameter entry (and its optimizer state, when an optimizer is given)."""
    for module, param_name, mask in masked_parameters(model):
        param = getattr(module, param_name)
        state = optimizer.state.get(param) if optimizer is not None else None
        ops.apply_mask_(param, mask, state)


def keep_masks_after_steps(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Re-apply the model's masks after every ``optimizer.step()``; returns the hook handle.

    Masked weights and their momentum / Adam moments stay exactly zero, whatever the optimizer
    does in between (weight decay, momentum from earlier gradients).
    """
    def hook(opt, args, kwargs):
        enforce_masks(model, opt)
    return optimizer.register_step_post_hook(hook)


def masked_optimizer(model: nn.Module, name: str = "sgd", params: Iterable | None = None, **kwargs):
    """A fused masked optimizer (``"sgd"`` or ``"adamw"``) over ``params`` (default: the model's
    trainable parameters) that keeps the model's ``*_mask`` buffers enforced in its own step.

    The masks are read bit-packed (``pack_masks=True`` unless given): the pruning loop replaces the
    buffers (:func:`nepenthe.masks.set_mask`) and in-place edits bump their version counter, so
    every change is seen; an edit through ``mask.data`` is not (pass ``pack_masks=False`` then)."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    kwargs.setdefault("pack_masks", True)
    if name == "sgd":
        return ops.MaskedSGD(params, masks=mask_lookup(model), **kwargs)
    if name == "adamw":
        return ops.MaskedAdamW(params, masks=mask_lookup(model), **kwargs)
    raise ValueError(f"unknown optimizer {name!r}; use 'sgd' or 'adamw'")
