"""The fused activation + histogram ops: ``nepenthe::activation_histogram`` (differentiable),
``activation_histogram_`` (inplace) and ``accumulate_activation_histogram`` (counts added into a
running histogram): φ(x) and the sign counts of x in one pass."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op

from ._args import (
    _check_activation_input,
    _check_bins,
    _check_hist,
    _check_input,
    _check_kind,
    _check_writable,
    _contiguous_hist,
    _plain_eager,
    as_3d,
    view_3d,
)
from .backends import select
from .constants import ACTIVATIONS, RELU6_UPPER, upper_kink

__all__ = ["accumulate_activation_histogram", "activation_backward", "activation_histogram", "activation_histogram_"]


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


def _run_activation(x: Tensor, y: Tensor, hist: Tensor, kind: str, channel_dim: int, negative_slope: float) -> None:
    """y = φ(x) and the counts of x into hist, on the selected backend (y may be x itself)."""
    _, impl = select("activation_histogram", x.device, (x.dtype,))
    if kind == "leaky_relu" and negative_slope == 0:
        kind = "relu"  # the same function, whose limit at -inf is 0 (x * 0 would make it NaN: reference.py)
    buf, temporary = _contiguous_hist(hist)
    upper = upper_kink(kind)
    x3 = as_3d(x, channel_dim)
    y3 = view_3d(y, channel_dim)  # None only for strides no 3-d view fits (then x3 is a copy too)
    if y3 is not None:
        impl.activation_histogram_(x3, y3, buf, ACTIVATIONS.index(kind), negative_slope, upper)
    else:  # write a contiguous [outer, C, inner] temporary (logical order of y's dims), then y
        out = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
        impl.activation_histogram_(x3, out, buf, ACTIVATIONS.index(kind), negative_slope, upper)
        y.copy_(out.view(y.shape))
    if temporary:
        hist += buf


def _activation_histogram_impl(x: Tensor, kind: str, channel_dim: int, negative_slope: float,
                          bins: int) -> tuple[Tensor, Tensor]:
    y = torch.empty_like(x)
    hist = torch.zeros(x.shape[channel_dim], bins, dtype=torch.int64, device=x.device)
    _run_activation(x, y, hist, kind, channel_dim, negative_slope)
    return y, hist


# The undecorated function runs plain eager calls directly (see _plain_eager).


_activation_histogram = custom_op("nepenthe::activation_histogram",
                                  mutates_args=())(_activation_histogram_impl)


@_activation_histogram.register_fake
def _(x, kind, channel_dim, negative_slope, bins):
    return torch.empty_like(x), x.new_empty((x.shape[channel_dim], bins), dtype=torch.int64)


def _activation_setup_context(ctx, inputs, output):
    x, kind, _, negative_slope, _ = inputs
    ctx.save_for_backward(x)
    ctx.kind, ctx.negative_slope = kind, negative_slope


def _activation_backward(ctx, grad_y, grad_hist):
    (x,) = ctx.saved_tensors
    return activation_backward(grad_y, x, ctx.kind, ctx.negative_slope), None, None, None, None


_activation_histogram.register_autograd(_activation_backward, setup_context=_activation_setup_context)


def _activation_histogram_inplace_impl(x: Tensor, hist: Tensor, kind: str, channel_dim: int,
                                  negative_slope: float) -> None:
    _run_activation(x, x, hist, kind, channel_dim, negative_slope)


# The undecorated function runs plain eager calls directly (see _plain_eager).


_activation_histogram_inplace = custom_op("nepenthe::activation_histogram_",
                                          mutates_args=("x", "hist"))(_activation_histogram_inplace_impl)


@_activation_histogram_inplace.register_fake
def _(x, hist, kind, channel_dim, negative_slope):
    return None


def _accumulate_activation_histogram_impl(x: Tensor, hist: Tensor, kind: str, channel_dim: int,
                                         negative_slope: float) -> Tensor:
    y = torch.empty_like(x)
    _run_activation(x, y, hist, kind, channel_dim, negative_slope)
    return y


# The undecorated function runs plain eager calls directly (see _plain_eager).


_accumulate_activation_histogram = custom_op("nepenthe::accumulate_activation_histogram",
                                             mutates_args=("hist",))(_accumulate_activation_histogram_impl)


@_accumulate_activation_histogram.register_fake
def _(x, hist, kind, channel_dim, negative_slope):
    return torch.empty_like(x)


def activation_histogram(x: Tensor, kind: str = "relu", channel_dim: int = 1, *, negative_slope: float = 0.01,
                         bins: int = 4) -> tuple[Tensor, Tensor]:
    """``(φ(x), sign histogram of x)`` in one pass over ``x``; differentiable in ``x``.

    ``kind`` is one of ``relu, relu6, leaky_relu, gelu, gelu_tanh, silu, hardswish``; the histogram
    counts the *input* of φ (SAT at 6 for relu6). Use it in place of the activation to measure
    while training; add the histogram into a running buffer.
    """
    what = f"activation_histogram({kind!r})"
    _check_kind(kind, what)
    _check_input(x, channel_dim, what)
    _check_activation_input(x, what)
    _check_bins(bins, what)
    direct = _plain_eager(x) and not (x.requires_grad and torch.is_grad_enabled())
    op = _activation_histogram_impl if direct else _activation_histogram
    return op(x, kind, channel_dim, float(negative_slope), bins)


def activation_histogram_(x: Tensor, hist: Tensor, kind: str = "relu", channel_dim: int = 1, *,
                          negative_slope: float = 0.01) -> Tensor:
    """Inplace ``x = φ(x)`` that adds the sign histogram of the old ``x`` into ``hist``; returns ``x``.

    Not differentiable (like any inplace op on a tensor autograd needs): use it under
    ``torch.no_grad()``, e.g. to measure a model with inplace activations.
    """
    what = f"activation_histogram_({kind!r})"
    _check_kind(kind, what)
    channels = _check_input(x, channel_dim, what)
    _check_activation_input(x, what)
    _check_hist(hist, channels, x.device, what)
    _check_writable(x, "x", what, "pass x.clone() (or x.contiguous()), or use accumulate_activation_histogram, "
                    "which writes a new tensor")
    direct = _plain_eager(x, hist) and not (x.requires_grad and torch.is_grad_enabled())
    op = _activation_histogram_inplace_impl if direct else _activation_histogram_inplace
    op(x, hist, kind, channel_dim, float(negative_slope))
    return x


def accumulate_activation_histogram(x: Tensor, hist: Tensor, kind: str = "relu", channel_dim: int = 1, *,
                                    negative_slope: float = 0.01) -> Tensor:
    """``φ(x)`` (a new tensor) with the sign histogram of ``x`` added into ``hist`` in the same pass.

    The running-buffer form of :func:`activation_histogram` (no per-call histogram to allocate and
    add): what ``measure`` runs at each rectifier call site. Not differentiable: use it under
    ``torch.no_grad()`` (or :func:`activation_histogram` when gradients must flow).
    """
    what = f"accumulate_activation_histogram({kind!r})"
    _check_kind(kind, what)
    channels = _check_input(x, channel_dim, what)
    _check_activation_input(x, what)
    _check_hist(hist, channels, x.device, what)
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{what}: the input requires grad but this op is not differentiable; call it under "
                         "torch.no_grad(), or use activation_histogram (differentiable) and add its histogram")
    op = _accumulate_activation_histogram_impl if _plain_eager(x, hist) else _accumulate_activation_histogram
    return op(x, hist, kind, channel_dim, float(negative_slope))
