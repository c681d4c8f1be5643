"""Drop-in ``torch.optim`` optimizers whose step applies pruning masks in the same fused pass.

:class:`MaskedSGD` and :class:`MaskedAdamW` take the arguments of ``torch.optim.SGD`` /
``torch.optim.AdamW``, keep the same state (``momentum_buffer``; ``step``, ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``), so their state_dicts load into each other, work with LR
schedulers and param groups, and add ``masks``: where a parameter's mask is False, the parameter
and its optimizer state are exactly zero after every step. Each step is one multi-tensor call of
:func:`nepenthe.ops.masked_sgd_` / :func:`nepenthe.ops.masked_adamw_` per parameter group.

``masks`` is a mapping ``parameter -> mask`` or a callable ``parameter -> mask or None`` asked at
every step (so masks that grow between pruning rounds are picked up); a mask is a bool tensor of the
parameter's shape or a packed ``uint8`` one (:func:`nepenthe.ops.pack_mask`), read as bits without
unpacking. :func:`nepenthe.masks.mask_lookup` builds one from the mask buffers of a model (bool
``*_mask`` or packed ``*_mask_bits``).

``pack_masks=True`` makes the step read each mask as bits (:mod:`nepenthe.ops.mask_bits`: an
eighth of a byte per weight instead of one, on a step that moves 20–28 bytes per fp32 weight). The
packed copy is made again whenever the mask is replaced or changed in place (a new tensor, or a
new value of its version counter, which every in-place torch op bumps); edits made through
``mask.data`` bypass the version counter and are not seen, so use it only when masks change by
in-place ops or replacement (as :func:`nepenthe.masks.set_mask` and the pruning loop do).

FSDP2 (``DTensor`` parameters, any mesh): each rank steps its own slices (parameter, gradient,
state, and the mask's slice: a bool ``DTensor``'s local part, or the packed bits of the slice that
:mod:`nepenthe.masks` stores per rank); the step is elementwise, so no communication is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from ..sharded import is_sharded, local
from .mask_bits import pack_mask, packed_mask_bytes
from .masked_optim import masked_adamw_, masked_sgd_

__all__ = ["MaskedAdamW", "MaskedSGD"]

MaskSource = Mapping[Tensor, Tensor] | Callable[[Tensor], Tensor | None] | None


def _mask_getter(masks: MaskSource) -> Callable[[Tensor], Tensor | None]:
    if masks is None:
        return lambda p: None
    if callable(masks):
        return masks
    by_id = {id(p): m for p, m in masks.items()}
    return lambda p: by_id.get(id(p))


def _grad_of(p: Tensor, who: str) -> Tensor:
    g = p.grad
    if g.is_sparse:
        raise RuntimeError(f"{who} does not support sparse gradients; use torch.optim.SparseAdam or dense grads")
    return g


def _evaluate_closure(closure) -> Tensor | None:
    """The loss of ``closure`` (with gradients on, as torch.optim does), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _mask_for(getter, p: Tensor, who: str, ready: dict | None = None) -> Tensor | None:
    """The bool mask of ``p`` on its device, or its packed mask as given (None: unmasked). ``ready``
    (id(p) -> mask) skips the checks while the getter keeps returning the same mask object that
    needed no conversion: its dtype and device cannot change in place, and the kernels re-check shape
    and layout. (A converted copy is
    made afresh at every step, so in-place edits of the mask are always seen.)"""
    mask = getter(p)
    if mask is None:
        return None
    key = id(p)
    if is_sharded(p):  # FSDP2: this rank's slice of both (a packed mask is stored per slice already)
        p, mask = local(p), local(mask)
    if ready is not None:
        if ready.get(key) is mask:
            return mask
    if mask.shape == p.shape:
        prepared = mask.to(device=p.device, dtype=torch.bool).contiguous()
    elif mask.dtype == torch.uint8 and mask.dim() == 1 and mask.numel() == packed_mask_bytes(p.numel()):
        prepared = mask.to(device=p.device).contiguous()  # stored packed (nepenthe.masks): the kernels read bits
    else:
        raise ValueError(f"{who}: mask of shape {tuple(mask.shape)} does not fit a parameter of shape "
                         f"{tuple(p.shape)} (a packed one would be uint8[{packed_mask_bytes(p.numel())}])")
    if ready is not None and prepared is mask:
        ready[key] = mask
    return prepared


class _PackedMasks:
    """Packed copies of the masks, one per parameter, remade when the mask object or its version
    counter changes (packing reads the whole mask: done per step it would cost what it saves)."""

    def __init__(self):
        self._packed: dict[int, tuple[Tensor, int, Tensor]] = {}  # id(param) -> (mask, its version, bits)

    def __call__(self, p: Tensor, mask: Tensor | None) -> Tensor | None:
        if mask is None or mask.dtype != torch.bool or mask.is_inference():
            return mask  # packed already (as stored); inference tensors have no version counter: stay bool
        hit = self._packed.get(id(p))
        if hit is not None and hit[0] is mask and hit[1] == mask._version:
            return hit[2]
        bits = pack_mask(mask)
        self._packed[id(p)] = (mask, mask._version, bits)
        return bits


def _mask_source(masks: MaskSource, pack_masks: bool):
    """(the getter, the checked-masks memo, the packer or None) an optimizer keeps."""
    return _mask_getter(masks), {}, (_PackedMasks() if pack_masks else None)


def _step_mask(opt, p: Tensor, who: str) -> Tensor | None:
    mask = _mask_for(opt._mask_of, p, who, opt._masks_ready)
    return mask if opt._packer is None else opt._packer(p, mask)


def _increment_steps(states: list[dict]) -> list[int]:
    """Add 1 to every ``state["step"]`` and return the new counts: one foreach add and one read for
    the usual float32 CPU step tensors (as torch.optim.AdamW keeps them), one at a time otherwise."""
    steps = [state["step"] for state in states]
    if steps and all(type(t) is Tensor for t in steps):
        torch._foreach_add_(steps, 1)
        try:
            return [int(x) for x in torch.stack(steps).tolist()]
        except RuntimeError:  # steps on several devices (or not scalars): read one at a time
            return [int(t) for t in steps]
    counts = []
    for state in states:
        state["step"] += 1
        counts.append(int(state["step"]))
    return counts


class MaskedSGD(torch.optim.Optimizer):
    """``torch.optim.SGD`` (momentum, dampening, nesterov, weight decay, maximize) + masks, fused."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 masks: MaskSource = None, pack_masks: bool = False):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize)
        super().__init__(params, defaults)
        self._mask_of, self._masks_ready, self._packer = _mask_source(masks, pack_masks)

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate_closure(closure)
        for group in self.param_groups:
            momentum = group["momentum"]
            # parameters whose momentum buffer starts now are stepped separately (first_step=True)
            batches = {False: ([], [], [], []), True: ([], [], [], [])}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                first = momentum != 0 and state.get("momentum_buffer") is None
                if first:
                    state["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format)
                params, grads, bufs, masks = batches[first]
                params.append(local(p))  # FSDP2: this rank's slices (the step is elementwise)
                grads.append(local(_grad_of(p, "MaskedSGD")))
                if momentum != 0:
                    bufs.append(local(state["momentum_buffer"]))
                masks.append(_step_mask(self, p, "MaskedSGD"))
            for first, (params, grads, bufs, masks) in batches.items():
                if params:
                    masked_sgd_(params, grads, bufs, masks, lr=float(group["lr"]), momentum=momentum,
                                dampening=group["dampening"], weight_decay=group["weight_decay"],
                                nesterov=group["nesterov"], maximize=group["maximize"], first_step=first)
        return loss


class MaskedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (weight decay, amsgrad, maximize) + masks, fused into one pass."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 masks: MaskSource = None, pack_masks: bool = False):
        # torch.optim.AdamW's constructor validates the arguments and fills the defaults; its
        # foreach/fused/capturable/differentiable switches do not apply: our kernel is the step.
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize)
        self._mask_of, self._masks_ready, self._packer = _mask_source(masks, pack_masks)

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate_closure(closure)
        for group in self.param_groups:
            amsgrad = group["amsgrad"]
            beta1, beta2 = group["betas"]
            stepped = [p for p in group["params"] if p.grad is not None]
            states = [self.state[p] for p in stepped]
            for p, state in zip(stepped, states):
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if amsgrad:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            by_step: dict[int, tuple[list, ...]] = {}
            for p, state, step in zip(stepped, states, _increment_steps(states)):
                lists = by_step.setdefault(step, ([], [], [], [], [], []))
                for seq, value in zip(lists, (p, _grad_of(p, "MaskedAdamW"), state["exp_avg"], state["exp_avg_sq"],
                                              state.get("max_exp_avg_sq"),
                                              _step_mask(self, p, "MaskedAdamW"))):
                    seq.append(None if value is None else local(value))  # FSDP2: this rank's slices
            for step, (params, grads, exp_avgs, exp_avg_sqs, maxes, masks) in by_step.items():
                masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, maxes if amsgrad else [], masks,
                              lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                              weight_decay=group["weight_decay"], step=step, amsgrad=amsgrad,
                              maximize=group["maximize"])
        return loss
