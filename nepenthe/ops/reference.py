"""Pure-PyTorch reference of every nepenthe op: the "torch" backend and the test oracle.

Each fused backend (C++ CPU, CUDA C++, Triton) implements the same *backend functions* as this
module (see :mod:`nepenthe.ops.backends` for the contract) and is tested against it: integer
counts exactly, floats within per-dtype tolerances.

Histogram layout: ``int64[C, bins]`` with columns ``ON, OFF, ZERO, SAT`` and, when ``bins == 5``,
``NONFINITE`` (see docs/method.md §1):

* ON        z > 0 (+Inf included)
* OFF       z < 0 (-Inf included)
* ZERO      z == 0
* SAT       z >= upper (only when the rectifier has an upper kink, e.g. 6 for ReLU6); SAT is a
            subset of ON, counted in addition to it
* NONFINITE NaN or ±Inf, counted in addition (a NaN is in no sign column: it compares false with
            everything). ``measure`` uses it to refuse non-finite activations without a second read.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import constants as _constants
from ._args import as_3d
from .constants import *  # noqa: F403  (the oracle's module carries the shared constants too)
from .constants import ACTIVATIONS, NONFINITE, OFF, ON, SAT, ZERO
from .mask_bits import as_bool_mask

__all__ = ["activation", "activation_histogram_", "as_3d", "masked_adamw_", "masked_sgd_", "sign_histogram",
           "sign_histogram_", *_constants.__all__]


# ----- histogram -----------------------------------------------------------------------------------
def sign_histogram_(hist: torch.Tensor, x3: torch.Tensor, upper: float | None) -> None:
    """Backend function: add the counts of ``x3`` ([outer, C, inner]) into ``hist`` (int64[C, bins])."""
    z = x3.detach().transpose(0, 1).reshape(x3.shape[1], -1) if x3.numel() else x3.new_empty(x3.shape[1], 0)
    hist[:, ON] += (z > 0).sum(dim=1)
    hist[:, OFF] += (z < 0).sum(dim=1)
    hist[:, ZERO] += (z == 0).sum(dim=1)
    if upper is not None:
        hist[:, SAT] += (z >= upper).sum(dim=1)
    if hist.shape[1] > NONFINITE:
        hist[:, NONFINITE] += (~torch.isfinite(z)).sum(dim=1)


def activation(x: torch.Tensor, kind: str, negative_slope: float = 0.01) -> torch.Tensor:
    """φ(x) for an activation kind of :data:`ACTIVATIONS`: PyTorch's functional ops, except at ±inf.

    **Infinities** (the rule of every backend): φ(±inf) is the limit of φ there. φ(+inf) = +inf
    (6 for relu6); φ(-inf) = -0.0 for gelu, gelu_tanh, silu and hardswish (the sign of their negative
    tail), 0 for relu and relu6, and -inf·slope for leaky_relu (0 when the slope is 0, which is relu).
    PyTorch's own formulas give NaN instead wherever they multiply -inf by 0 (and its fp32 CPU
    GELU gives NaN at +inf too, while its fp64 and CUDA ones give +inf): a NaN no limit justifies,
    which would poison everything after the layer. The kernels get it by taking -inf as -FLT_MAX,
    which each formula maps to -0.0. NaN stays NaN.
    """
    if kind == "relu":
        return F.relu(x)
    if kind == "relu6":
        return F.relu6(x)
    if kind == "leaky_relu":
        return F.relu(x) if negative_slope == 0 else F.leaky_relu(x, negative_slope)
    if kind == "gelu":
        y = F.gelu(x)
    elif kind == "gelu_tanh":
        y = F.gelu(x, approximate="tanh")
    elif kind == "silu":
        y = F.silu(x)
    elif kind == "hardswish":
        y = F.hardswish(x)
    else:
        raise ValueError(f"unknown activation {kind!r}; expected one of {ACTIVATIONS}")
    y = torch.where(x == -math.inf, torch.full((), -0.0, dtype=y.dtype, device=y.device), y)
    return torch.where(x == math.inf, x, y)


def activation_histogram_(x3: torch.Tensor, y3: torch.Tensor, hist: torch.Tensor, kind: int,
                          negative_slope: float, upper: float | None) -> None:
    """Backend function: ``y3 = φ(x3)`` and the counts of ``x3`` added into ``hist``, in one call.

    ``x3``/``y3`` are [outer, C, inner] views (any strides, possibly the same memory for an
    inplace call); ``kind`` is the index into :data:`ACTIVATIONS`.
    """
    sign_histogram_(hist, x3, upper)  # before writing y3: y3 may alias x3
    y3.copy_(activation(x3, ACTIVATIONS[kind], negative_slope))


# ----- user-level reference forms (the oracle the public ops are tested against) --------------------
def sign_histogram(x: torch.Tensor, channel_dim: int = 1, upper: float | None = None, bins: int = 4) -> torch.Tensor:
    """Per-channel counts of the sign states of ``x`` as ``int64[C, bins]``."""
    x3 = as_3d(x.detach(), channel_dim)
    hist = torch.zeros(x3.shape[1], bins, dtype=torch.int64, device=x.device)
    sign_histogram_(hist, x3, upper)
    return hist


# ----- masked optimizer steps ----------------------------------------------------------------------
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _upcast(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 working copies of fp16/bf16 tensors (the tensors themselves otherwise).

    **Low precision** (the rule of every backend, and of torch's fused AdamW): an fp16/bf16 step is
    computed in fp32 from the stored values and each result is rounded once, when it is stored. So
    a second moment that overflows fp16 is stored as inf, but the step that produced it is taken
    with its fp32 value (rounding every intermediate, as torch's for-loop AdamW does, would divide
    by inf and skip that step).
    """
    return [t.float() if t.dtype in _LOW_PRECISION else t for t in tensors]


def _store(into: list[torch.Tensor], work: list[torch.Tensor]) -> None:
    for t, w in zip(into, work):
        if w is not t:
            t.copy_(w)


@torch.no_grad()
def masked_sgd_(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
                masks: list[torch.Tensor | None], lr: float, momentum: float, dampening: float,
                weight_decay: float, nesterov: bool, maximize: bool, first_step: bool) -> None:
    """Backend function: one SGD step (torch.optim.SGD's arithmetic, op for op), then the mask.

    ``momentum_buffers`` is empty when ``momentum == 0``; on ``first_step`` each buffer is set to
    the gradient (as torch.optim.SGD does) instead of being decayed. Masked entries of the
    parameter and of its buffer end exactly zero.
    """
    for i, (p_out, g) in enumerate(zip(params, grads)):
        p, g = _upcast([p_out, g])
        bufs_out = [momentum_buffers[i]] if momentum != 0 else []
        bufs = _upcast(bufs_out)
        g = -g if maximize else g
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        if momentum != 0:
            buf = bufs[0]
            if first_step:
                buf.copy_(g)
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            g = g.add(buf, alpha=momentum) if nesterov else buf
        p.add_(g, alpha=-lr)
        keep = as_bool_mask(masks[i], p)
        if keep is not None:
            for t in [p, *bufs]:
                t.masked_fill_(~keep, 0)
        _store([p_out, *bufs_out], [p, *bufs])


@torch.no_grad()
def masked_adamw_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                  exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor],
                  masks: list[torch.Tensor | None], lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float, step: int, amsgrad: bool, maximize: bool) -> None:
    """Backend function: one AdamW step (torch.optim.AdamW's arithmetic) at step count ``step``
    (already incremented, ≥ 1), then the mask. ``max_exp_avg_sqs`` is empty unless ``amsgrad``."""
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    step_size = lr / bias_correction1
    for i in range(len(params)):
        outs = [params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]] + ([max_exp_avg_sqs[i]] if amsgrad else [])
        work = _upcast(outs)
        p, g, m, v = work[:4]
        g = -g if maximize else g
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if amsgrad:
            vmax = work[4]
            torch.maximum(vmax, v, out=vmax)
            denom = (vmax.sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)
        keep = as_bool_mask(masks[i], p)
        if keep is not None:
            for t in [p, m, v] + work[4:]:
                t.masked_fill_(~keep, 0)
        _store(outs[:1] + outs[2:], work[:1] + work[2:])
