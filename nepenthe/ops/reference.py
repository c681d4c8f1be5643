"""Pure-PyTorch reference of every nepenthe op: the "torch" backend and the test oracle.

Each fused backend (C++ CPU, CUDA C++, Triton) implements the same *backend functions* as this
module (see :mod:`nepenthe.ops.backends` for the contract) and is tested against it: integer
counts exactly, floats within per-dtype tolerances.

Histogram layout: ``int64[C, bins]`` with columns ``ON, OFF, ZERO, SAT`` and, when ``bins == 5``,
``NONFINITE`` (see SPEC §1):

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

__all__ = ["ACTIVATIONS", "AGGREGATES", "GELU", "GELU_TANH", "HARDSWISH", "HISTOGRAM_BINS", "LEAKY_RELU",
           "NONFINITE", "NUM_STATES", "OFF", "ON", "RELU", "RELU6", "RELU6_UPPER", "SAT", "SILU", "STATE_NAMES",
           "ZERO", "ZERO_AS", "activation", "activation_backward", "activation_histogram_",
           "aggregate_layer_entropy", "aggregate_layer_entropy_tensor", "apply_mask_", "as_3d", "binary_entropy",
           "entropy_from_histogram", "masked_adamw_", "masked_sgd_", "neuron_entropy_from_histogram",
           "sign_histogram", "sign_histogram_", "state_counts", "upper_kink", "view_3d"]

ON, OFF, ZERO, SAT, NONFINITE = 0, 1, 2, 3, 4
NUM_STATES = 4
HISTOGRAM_BINS = (4, 5)
STATE_NAMES = ("on", "off", "zero", "sat")

ZERO_AS = ("exclude", "off", "on")
AGGREGATES = ("mean", "mixed_mean", "sum")

# Activations with a fused forward + histogram. The index of a kind is its integer code in the
# compiled backends (csrc/ and kernels/ use the same numbering).
ACTIVATIONS = ("relu", "relu6", "leaky_relu", "gelu", "gelu_tanh", "silu", "hardswish")
RELU, RELU6, LEAKY_RELU, GELU, GELU_TANH, SILU, HARDSWISH = range(len(ACTIVATIONS))
RELU6_UPPER = 6.0


def upper_kink(kind: str) -> float | None:
    """The SAT threshold the histogram of an activation kind counts (None: no upper kink)."""
    return RELU6_UPPER if kind == "relu6" else None


# ----- histogram -----------------------------------------------------------------------------------
def as_3d(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """View ``x`` as ``[outer, C, inner]`` around its channel dim, without copying when possible.

    Contiguous N×C×H×W gives strides (CHW, HW, 1), channels_last gives (HWC, 1, C), a [B, T, C]
    Linear output with channel_dim=-1 gives [B·T, C, 1]. Only a layout whose leading or trailing
    dims cannot be merged (e.g. a transposed slice) is copied.
    """
    if x.dim() == 0:
        raise ValueError("a histogram needs a tensor with at least one dimension, got a scalar")
    x3 = view_3d(x, channel_dim)
    return x3 if x3 is not None else view_3d(x.contiguous(), channel_dim)


def view_3d(t: torch.Tensor, channel_dim: int) -> torch.Tensor | None:
    """``t`` as [outer, C, inner] *without* copying, or None when its strides admit no such view."""
    d = channel_dim % t.dim()
    try:
        return t.view(math.prod(t.shape[:d]), t.shape[d], math.prod(t.shape[d + 1:]))
    except RuntimeError:
        return None


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
    """φ(x) for an activation kind of :data:`ACTIVATIONS` (PyTorch's own functional ops)."""
    if kind == "relu":
        return F.relu(x)
    if kind == "relu6":
        return F.relu6(x)
    if kind == "leaky_relu":
        return F.leaky_relu(x, negative_slope)
    if kind == "gelu":
        return F.gelu(x)
    if kind == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if kind == "silu":
        return F.silu(x)
    if kind == "hardswish":
        return F.hardswish(x)
    raise ValueError(f"unknown activation {kind!r}; expected one of {ACTIVATIONS}")


def activation_backward(grad: torch.Tensor, x: torch.Tensor, kind: str, negative_slope: float = 0.01) -> torch.Tensor:
    """dL/dx from dL/dy for φ at input ``x`` (ATen's own backward kernels)."""
    aten = torch.ops.aten
    if kind == "relu":
        return aten.threshold_backward(grad, x, 0)
    if kind == "relu6":
        return aten.hardtanh_backward(grad, x, 0.0, RELU6_UPPER)
    if kind == "leaky_relu":
        return aten.leaky_relu_backward(grad, x, negative_slope, False)
    if kind in ("gelu", "gelu_tanh"):
        return aten.gelu_backward(grad, x, approximate="tanh" if kind == "gelu_tanh" else "none")
    if kind == "silu":
        return aten.silu_backward(grad, x)
    if kind == "hardswish":
        return aten.hardswish_backward(grad, x)
    raise ValueError(f"unknown activation {kind!r}; expected one of {ACTIVATIONS}")


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


# ----- entropy ------------------------------------------------------------------------------------
def state_counts(hist: torch.Tensor, zero_as: str = "exclude") -> tuple[torch.Tensor, ...]:
    """Split a histogram into the counts the entropy is computed from: (off, on_linear, sat).

    ``on_linear`` are ON observations below the upper kink. ``zero_as`` decides where exact zeros
    go: "exclude" (the paper), "off" (EGP's code) or "on" (EASIER's code).
    """
    if zero_as not in ZERO_AS:
        raise ValueError(f"zero_as must be one of {ZERO_AS}, got {zero_as!r}")
    h = hist.to(torch.float64)
    off, sat = h[:, OFF], h[:, SAT]
    on_linear = h[:, ON] - sat
    if zero_as == "off":
        off = off + h[:, ZERO]
    elif zero_as == "on":
        on_linear = on_linear + h[:, ZERO]
    return off, on_linear, sat


def neuron_entropy_from_histogram(hist: torch.Tensor, zero_as: str = "exclude") -> torch.Tensor:
    """Per-neuron entropy in bits (float64[C]) of the rectifier's regions on the data.

    Without an upper kink this is the binary entropy of p = ON / (ON + OFF) of SPEC §1. With a
    kink (ReLU6) the ON state is split into "linear" (0 < z < upper) and SAT (z >= upper), so the
    entropy is over three regions and is 0 exactly when the neuron stays in one region, i.e. when
    the rectifier is affine on it — the property folding needs. A neuron with no counted
    observation has entropy 0.
    """
    counts = torch.stack(state_counts(hist, zero_as), dim=1)  # [C, 3]
    total = counts.sum(dim=1, keepdim=True)
    q = counts / total.clamp_min(1.0)
    terms = torch.where(q > 0, -q * torch.log2(q.clamp_min(torch.finfo(q.dtype).tiny)), torch.zeros_like(q))
    return terms.sum(dim=1)


def aggregate_layer_entropy_tensor(neuron_entropy: torch.Tensor, aggregate: str = "mean") -> torch.Tensor:
    """Layer entropy (float64 scalar tensor) from per-neuron entropies, without a host sync."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    e = neuron_entropy.to(torch.float64)
    if aggregate == "sum":
        return e.sum()
    if aggregate == "mixed_mean":
        mixed = (e > 0).to(torch.float64)
        return (e * mixed).sum() / mixed.sum().clamp_min(1.0)
    return e.sum() / max(e.numel(), 1)


def aggregate_layer_entropy(neuron_entropy: torch.Tensor, aggregate: str = "mean") -> float:
    """Layer entropy from per-neuron entropies: "mean" (default), "mixed_mean" (EGP) or "sum"."""
    return float(aggregate_layer_entropy_tensor(neuron_entropy, aggregate))


def entropy_from_histogram(hist: torch.Tensor, zero_as: str = "exclude",
                           aggregate: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """(per-neuron entropy float64[C], layer entropy float64 scalar) of a sign histogram."""
    neuron = neuron_entropy_from_histogram(hist, zero_as)
    return neuron, aggregate_layer_entropy_tensor(neuron, aggregate)


def binary_entropy(p: float) -> float:
    """H(p) in bits with 0·log 0 = 0 (used by tests and docs as the scalar definition)."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -p * math.log2(p) - (1.0 - p) * math.log2(1.0 - p)


# ----- masked optimizer steps ------------------------------------------------------------------------
_STATE_TENSOR_NAMES = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@torch.no_grad()
def apply_mask_(param: torch.Tensor, mask: torch.Tensor, state: dict | None = None) -> None:
    """Zero the masked entries of a parameter and of its per-element optimizer state in place.

    Entries are *set* to zero (not multiplied by 0, which would keep a NaN or -0.0), so masked
    weights and their momentum / Adam moments are exactly +0.0 afterwards.
    """
    dropped = ~mask if mask.dtype == torch.bool else mask == 0
    param.masked_fill_(dropped, 0)
    for key in _STATE_TENSOR_NAMES:
        buf = (state or {}).get(key)
        if isinstance(buf, torch.Tensor) and buf.shape == param.shape:
            buf.masked_fill_(dropped, 0)


@torch.no_grad()
def masked_sgd_(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
                masks: list[torch.Tensor | None], lr: float, momentum: float, dampening: float,
                weight_decay: float, nesterov: bool, maximize: bool, first_step: bool) -> None:
    """Backend function: one SGD step (torch.optim.SGD's arithmetic, op for op), then the mask.

    ``momentum_buffers`` is empty when ``momentum == 0``; on ``first_step`` each buffer is set to
    the gradient (as torch.optim.SGD does) instead of being decayed. Masked entries of the
    parameter and of its buffer end exactly zero.
    """
    for i, (p, g) in enumerate(zip(params, grads)):
        g = -g if maximize else g
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if first_step:
                buf.copy_(g)
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            g = g.add(buf, alpha=momentum) if nesterov else buf
        p.add_(g, alpha=-lr)
        if masks[i] is not None:
            p.masked_fill_(~masks[i], 0)
            if momentum != 0:
                momentum_buffers[i].masked_fill_(~masks[i], 0)


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
    for i, (p, g) in enumerate(zip(params, grads)):
        g = -g if maximize else g
        m, v = exp_avgs[i], exp_avg_sqs[i]
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], v, out=max_exp_avg_sqs[i])
            denom = (max_exp_avg_sqs[i].sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)
        if masks[i] is not None:
            keep = masks[i]
            for t in (p, m, v) + ((max_exp_avg_sqs[i],) if amsgrad else ()):
                t.masked_fill_(~keep, 0)
