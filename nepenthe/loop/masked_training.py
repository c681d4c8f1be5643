"""Training with masks: keeping a model's ``*_mask`` buffers enforced by any optimizer, or by the
fused masked optimizers of :mod:`nepenthe.ops` (the bridge between the mask storage of
:mod:`nepenthe.masks` and the ops layer)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import ops
from ..masks import mask_lookup, masked_parameters
from ..ops.mask_bits import as_bool_mask
from ..sharded import is_sharded, local

__all__ = ["enforce_masks", "keep_masks_after_steps", "masked_optimizer", "masks_enforced", "repair_masked_weights"]


def _on_this_rank(param: torch.Tensor, mask: torch.Tensor, state: dict | None):
    """FSDP2: this rank's slices of a parameter, of its mask (a bool DTensor's, or the packed bits of the
    slice as stored) and of its optimizer state, so that each rank zeroes its own; as they are otherwise."""
    if not is_sharded(param):
        return param, mask, state
    state = {k: local(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()} if state else state
    return local(param), local(mask), state


@torch.no_grad()
def enforce_masks(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Zero every masked parameter entry (and its optimizer state, when an optimizer is given)."""
    for module, param_name, mask in masked_parameters(model):
        param = getattr(module, param_name)
        state = optimizer.state.get(param) if optimizer is not None else None
        ops.apply_mask_(*_on_this_rank(param, mask, state))


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


def _enforces_masks_itself(opt: torch.optim.Optimizer, held: dict) -> bool:
    """A fused masked optimizer whose own masks cover every masked parameter it steps (its step
    already leaves them zero: the fast path)."""
    if not isinstance(opt, (ops.MaskedSGD, ops.MaskedAdamW)):
        return False
    return all(opt._mask_of(p) is not None for group in opt.param_groups for p in group["params"] if id(p) in held)


@contextlib.contextmanager
def masks_enforced(model: nn.Module) -> Iterator[None]:
    """While the block runs, every ``torch.optim`` optimizer step (any optimizer, any trainer built on
    them: a plain loop, Lightning, the Hugging Face ``Trainer``) re-applies ``model``'s masks to the
    parameters it stepped and zeroes their optimizer state there, so weight decay and momentum
    cannot revive pruned weights. The fused masked optimizers, which do this in their own step, are
    left alone. The pruning loop runs ``retrain`` inside it; use it around your own training of a
    pruned model.

    A global optimizer step hook (``torch.optim.optimizer.register_optimizer_step_post_hook``), removed
    when the block ends; the masks are those attached when it starts.
    """
    held = {id(getattr(m, name)): (getattr(m, name), mask) for m, name, mask in masked_parameters(model)}
    fast: dict[int, bool] = {}

    @torch.no_grad()
    def hook(opt, args, kwargs):
        if id(opt) not in fast:
            fast[id(opt)] = _enforces_masks_itself(opt, held)
        if fast[id(opt)]:
            return
        for group in opt.param_groups:
            for p in group["params"]:
                entry = held.get(id(p))
                if entry is not None and entry[0] is p:
                    ops.apply_mask_(*_on_this_rank(p, entry[1], opt.state.get(p)))

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def repair_masked_weights(model: nn.Module) -> dict[str, int]:
    """Zero masked weights that are not zero (an update that bypassed the optimizer hooks: a write
    to ``.data``, a custom optimizer) and return how many were revived per parameter
    (``{"layer.weight": count}``; empty when the masks held)."""
    revived = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for module, param_name, mask in masked_parameters(model):
        param = getattr(module, param_name)
        name = names.get(id(param), param_name)
        param, mask, _ = _on_this_rank(param, mask, None)  # FSDP2: each rank repairs, and reports, its own
        mask = as_bool_mask(mask, param)  # a packed mask: unpacked for this layer only
        dropped = ~mask if mask.dtype == torch.bool else mask == 0
        count = int(torch.count_nonzero(param.detach()[dropped]))
        if count:
            revived[name] = count
            param.masked_fill_(dropped, 0)
        del mask, dropped  # this layer's bool copies, before the next layer's are made
    return revived
