"""The argument rules of the public ops: checks whose errors name the tensor and say what to pass,
and when a plain eager call may skip the ``torch.library`` dispatch."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .constants import ACTIVATIONS, HISTOGRAM_BINS


def _check_input(x: Tensor, channel_dim: int, what: str) -> int:
    """The number of channels of ``x``; ValueError naming ``what`` when ``x`` cannot be counted."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: expected a tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{what}: needs a tensor with at least one dimension (the neurons), got a scalar")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{what}: sign states need a real-valued tensor, got {x.dtype}")
    if not -x.dim() <= channel_dim < x.dim():
        raise ValueError(f"{what}: channel_dim={channel_dim} is out of range for a {x.dim()}-d tensor of shape "
                         f"{tuple(x.shape)}")
    return x.shape[channel_dim]


def _check_hist(hist: Tensor, channels: int, device: torch.device, what: str) -> None:
    if (not isinstance(hist, Tensor) or hist.dtype != torch.int64 or hist.dim() != 2
            or hist.shape[0] != channels or hist.shape[1] not in HISTOGRAM_BINS):
        got = f"{hist.dtype}{list(hist.shape)}" if isinstance(hist, Tensor) else type(hist).__name__
        raise ValueError(f"{what}: the histogram buffer must be int64[{channels}, 4] (ON, OFF, ZERO, SAT) or "
                         f"int64[{channels}, 5] (+ NONFINITE) for an input with {channels} channels, got {got}")
    if hist.device != device:
        raise ValueError(f"{what}: the histogram is on {hist.device} but the input on {device}; keep them together")


def _check_bins(bins: int, what: str) -> None:
    if bins not in HISTOGRAM_BINS:
        raise ValueError(f"{what}: bins must be 4 (ON, OFF, ZERO, SAT) or 5 (+ NONFINITE), got {bins}")


def _check_kind(kind: str, what: str) -> None:
    if kind not in ACTIVATIONS:
        raise ValueError(f"{what}: unknown activation {kind!r}; fused activations are {ACTIVATIONS}")


def _check_activation_input(x: Tensor, what: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{what}: activations need a floating-point tensor, got {x.dtype}")


_INFRA_MODES = tuple(getattr(torch._C._TorchDispatchModeKey, k) for k in ("FAKE", "PROXY", "FUNCTIONAL")
                     if hasattr(torch._C._TorchDispatchModeKey, k))


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def _plain_eager(*tensors: Tensor) -> bool:
    """True when a call can skip the ``torch.library`` dispatch and run its implementation directly.

    The custom op's Python dispatch costs tens of microseconds per call, which ``measure`` pays at
    every rectifier call site (a third of a batch-1 ResNet forward on CPU). It is only needed when
    something must see the op as a node: compiling, tracing (fx proxies are not tensors; make_fx /
    export run under dispatch modes), fake or subclass tensors, functorch transforms and modes.
    Autograd is the caller's check (the ops that need it test ``requires_grad`` themselves).
    ``nn.Parameter`` counts as a plain tensor (it only disables ``__torch_function__``).
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active()):
        return False
    if any(torch._C._get_dispatch_mode(key) is not None for key in _INFRA_MODES):
        return False
    return all(type(t) in _PLAIN_TYPES for t in tensors)


def _contiguous_hist(hist: Tensor) -> tuple[Tensor, bool]:
    """(buffer a backend may write, whether it is a temporary to add back into ``hist``)."""
    return (hist, False) if hist.is_contiguous() else (torch.zeros_like(hist, memory_format=torch.contiguous_format),
                                                       True)


# ----- layout: the [outer, C, inner] views the backends take -----------------------------------------
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
