"""``nepenthe::masked_sgd_`` and ``nepenthe::masked_adamw_``: one multi-tensor optimizer step with the
masks applied in the same pass (masked weights and their state stay exactly zero)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op

from . import reference
from ._args import _check_writable, _plain_eager, check_adamw_hyperparameters, check_sgd_hyperparameters
from .backends import TABLE, select
from .constants import KERNEL_DTYPES
from .mask_bits import as_bool_mask, is_packed_mask

__all__ = ["apply_mask_", "masked_adamw_", "masked_sgd_"]

_STATE_TENSOR_NAMES = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@torch.no_grad()
def apply_mask_(param: torch.Tensor, mask: torch.Tensor, state: dict | None = None) -> None:
    """Zero the masked entries of a parameter and of its per-element optimizer state in place.

    Entries are *set* to zero (not multiplied by 0, which would keep a NaN or -0.0), so masked
    weights and their momentum / Adam moments are exactly +0.0 afterwards.
    """
    if mask.shape != param.shape:
        mask = as_bool_mask(mask, param)  # a packed mask
    dropped = ~mask if mask.dtype == torch.bool else mask == 0
    param.masked_fill_(dropped, 0)
    for key in _STATE_TENSOR_NAMES:
        buf = (state or {}).get(key)
        if isinstance(buf, torch.Tensor) and buf.shape == param.shape:
            buf.masked_fill_(dropped, 0)


@torch.no_grad()


def _check_lists(op: str, params: list[Tensor], named: dict[str, list], masks: list) -> None:
    for name, tensors in named.items():
        if len(tensors) != len(params):
            raise ValueError(f"{op}: {name} has {len(tensors)} tensors for {len(params)} parameters")
    if len(masks) != len(params):
        raise ValueError(f"{op}: masks has {len(masks)} entries for {len(params)} parameters (use None for no mask)")
    for i, p in enumerate(params):
        if not p.is_floating_point():
            raise ValueError(f"{op}: parameter {i} is {p.dtype}; only floating-point parameters can be optimized")
        for name, tensors in named.items():
            t = tensors[i]
            if t.shape != p.shape or t.device != p.device:
                raise ValueError(f"{op}: {name}[{i}] has shape {tuple(t.shape)} on {t.device}, parameter {i} "
                                 f"{tuple(p.shape)} on {p.device}")
            if t.is_sparse:
                raise ValueError(f"{op}: {name}[{i}] is sparse; masked steps need dense gradients and state")
            if name != "grads":
                _check_writable(t, f"{name}[{i}]", op, "give each parameter state of its own (torch.zeros_like)")
        _check_writable(p, f"params[{i}]", op, "optimize a parameter of its own (materialise it with .clone())")
        m = masks[i]
        if m is None:
            continue
        if m.device != p.device or not ((m.dtype == torch.bool and m.shape == p.shape) or is_packed_mask(m, p)):
            raise ValueError(f"{op}: mask {i} must be a bool tensor of shape {tuple(p.shape)} or a packed one "
                             f"(nepenthe.ops.pack_mask: uint8[{(p.numel() + 7) // 8}]) on {p.device}, got "
                             f"{m.dtype}{list(m.shape)} on {m.device}")


def _groups(op: str, params: list[Tensor], lists: list[list[Tensor]], masks: list):
    """Split parameter indices by (backend implementation, its masks): kernel-ready ones grouped per
    device, and the rest (non-contiguous, mixed dtypes, dtypes without kernels) for the reference.
    Packed masks are unpacked for a backend that cannot read them."""
    by_device: dict[torch.device, list[int]] = {}
    odd: list[int] = []
    for i, p in enumerate(params):
        same = all(t[i].dtype == p.dtype and t[i].is_contiguous() for t in lists)
        mask_ok = masks[i] is None or masks[i].is_contiguous()
        if p.dtype in KERNEL_DTYPES and p.is_contiguous() and same and mask_ok:
            by_device.setdefault(p.device, []).append(i)
        else:
            odd.append(i)
    groups = []
    for device, idx in by_device.items():
        name, impl = select(op, device, tuple({params[i].dtype for i in idx}))
        group_masks = _pick(masks, idx)
        if not TABLE[name].packed_masks:
            group_masks = [as_bool_mask(m, params[i]) for m, i in zip(group_masks, idx)]
        groups.append((impl, idx, group_masks))
    if odd:
        groups.append((reference, odd, _pick(masks, odd)))
    return groups


def _pick(seq, idx):
    return [seq[i] for i in idx]


def _eager_step(op: str, params: list[Tensor], mutated: list[Tensor], call) -> bool:
    """Run a plain eager CPU step straight on the ``cpp`` kernel, skipping the custom-op machinery
    (whose per-call Python cost, ~0.5 ms for a ResNet-18's 62 parameters, is a tenth of the step
    itself): ``call(impl)`` when the call is plain eager (``_plain_eager``), grad mode is off (as
    inside ``Optimizer.step``), the parameters are on the CPU and ``cpp`` is the backend selected
    for them. True when it ran. The kernel validates every tensor before it writes any, so a call it
    rejects (bad arguments, non-contiguous or mixed tensors) returns False, to be redone on the full
    path, which raises the Python error or handles the odd tensors."""
    if not params or torch.is_grad_enabled() or params[0].device.type != "cpu" or not _plain_eager(*params):
        return False
    name, impl = select(op, params[0].device, (params[0].dtype,))
    if name != "cpp":
        return False
    try:
        call(impl)
    except RuntimeError:
        return False  # rejected before any write
    torch._C._increment_version(mutated)  # as the custom op does for its mutated arguments
    return True


@custom_op("nepenthe::masked_sgd_", mutates_args=("params", "momentum_buffers"))
def _masked_sgd(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
                masks: list[Tensor | None], lr: float, momentum: float, dampening: float, weight_decay: float,
                nesterov: bool, maximize: bool, first_step: bool) -> None:
    grads = [g.contiguous() for g in grads]
    lists = [grads] + ([momentum_buffers] if momentum != 0 else [])
    for impl, idx, group_masks in _groups("masked_sgd_", params, lists, masks):
        bufs = _pick(momentum_buffers, idx) if momentum != 0 else []
        impl.masked_sgd_(_pick(params, idx), _pick(grads, idx), bufs, group_masks, lr, momentum, dampening,
                         weight_decay, nesterov, maximize, first_step)


@_masked_sgd.register_fake
def _(params, grads, momentum_buffers, masks, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step):
    return None


def masked_sgd_(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
                masks: list[Tensor | None], *, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False,
                first_step: bool = False) -> None:
    """One ``torch.optim.SGD`` step over many parameters, with the masks applied in the same pass.

    Masked entries (mask False) of each parameter and of its momentum buffer end exactly zero.
    A mask is a bool tensor of the parameter's shape, a bit-packed one (:func:`nepenthe.ops.pack_mask`;
    an eighth of the bytes to read per step) or None.
    ``momentum_buffers``: one per parameter when ``momentum != 0`` (on ``first_step`` they are
    overwritten with the gradient, as torch.optim.SGD initialises them), else empty.
    """
    check_sgd_hyperparameters(float(lr), float(momentum), float(dampening), float(weight_decay), bool(nesterov))
    named = {"grads": grads}
    if momentum != 0:
        named["momentum_buffers"] = momentum_buffers
    elif momentum_buffers:
        raise ValueError("masked_sgd_: momentum_buffers must be empty when momentum == 0")
    bufs = list(momentum_buffers)
    if _eager_step("masked_sgd_", params, list(params) + bufs, lambda impl: impl.masked_sgd_(
            params, grads, bufs, masks, float(lr), float(momentum), float(dampening), float(weight_decay),
            bool(nesterov), bool(maximize), bool(first_step))):
        return
    _check_lists("masked_sgd_", params, named, masks)
    if not params:
        return
    _masked_sgd(params, grads, bufs, list(masks), float(lr), float(momentum), float(dampening),
                float(weight_decay), bool(nesterov), bool(maximize), bool(first_step))


@custom_op("nepenthe::masked_adamw_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"))
def _masked_adamw(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                  max_exp_avg_sqs: list[Tensor], masks: list[Tensor | None], lr: float, beta1: float, beta2: float,
                  eps: float, weight_decay: float, step: int, amsgrad: bool, maximize: bool) -> None:
    grads = [g.contiguous() for g in grads]
    lists = [grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    for impl, idx, group_masks in _groups("masked_adamw_", params, lists, masks):
        maxes = _pick(max_exp_avg_sqs, idx) if amsgrad else []
        impl.masked_adamw_(_pick(params, idx), _pick(grads, idx), _pick(exp_avgs, idx), _pick(exp_avg_sqs, idx),
                           maxes, group_masks, lr, beta1, beta2, eps, weight_decay, step, amsgrad, maximize)


@_masked_adamw.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks, lr, beta1, beta2, eps, weight_decay, step,
      amsgrad, maximize):
    return None


def masked_adamw_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                  max_exp_avg_sqs: list[Tensor], masks: list[Tensor | None], *, lr: float, beta1: float = 0.9,
                  beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2, step: int,
                  amsgrad: bool = False, maximize: bool = False) -> None:
    """One ``torch.optim.AdamW`` step at step count ``step`` (≥ 1, already incremented) over many
    parameters, with the masks applied in the same pass: masked entries of each parameter and of
    its moments end exactly zero. ``max_exp_avg_sqs`` is used (one per parameter) only with amsgrad."""
    if step < 1:
        raise ValueError(f"masked_adamw_: step must be >= 1 (the count after this step), got {step}")
    check_adamw_hyperparameters(float(lr), float(beta1), float(beta2), float(eps), float(weight_decay))
    named = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        named["max_exp_avg_sqs"] = max_exp_avg_sqs
    maxes = list(max_exp_avg_sqs) if amsgrad else []
    if _eager_step("masked_adamw_", params, list(params) + list(exp_avgs) + list(exp_avg_sqs) + maxes,
                   lambda impl: impl.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, maxes, masks, float(lr),
                                                   float(beta1), float(beta2), float(eps), float(weight_decay),
                                                   int(step), bool(amsgrad), bool(maximize))):
        return
    _check_lists("masked_adamw_", params, named, masks)
    if not params:
        return
    _masked_adamw(params, grads, exp_avgs, exp_avg_sqs, maxes, list(masks),
                  float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), int(step), bool(amsgrad),
                  bool(maximize))
