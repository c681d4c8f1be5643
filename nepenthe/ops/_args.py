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
    _check_writable(hist, "hist", what, f"pass a buffer of its own, e.g. torch.zeros({channels}, "
                    f"{hist.shape[1]}, dtype=torch.int64)")


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


# ----- tensors written in place: no two elements may share memory ---------------------------------------
def _shares_memory(t: Tensor) -> bool:
    """True when two elements of ``t`` are the same memory location (an expanded or overlapping view).

    Decided from sizes and strides alone: dims sorted by stride, each stride larger than every offset
    the smaller dims reach is the usual proof of no overlap (contiguous, channels_last, slices,
    transposes); a stride of 0 on a dim longer than 1 is an overlap; a layout that fits neither
    (interleaved strides, rare) is decided exactly by listing its offsets.
    """
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1)
    if any(sz == 0 for sz in t.shape) or not dims:
        return False
    reach = 0
    for st, sz in dims:
        if st <= reach:
            break
        reach += st * (sz - 1)
    else:
        return False
    if dims[0][0] == 0:
        return True
    offsets = torch.zeros((), dtype=torch.int64)
    for st, sz in dims:
        offsets = (offsets.unsqueeze(-1) + torch.arange(sz, dtype=torch.int64) * st).flatten()
    return torch.unique(offsets).numel() != offsets.numel()


def _check_writable(t: Tensor, name: str, what: str, fix: str) -> None:
    """ValueError when ``t`` (written in place) has elements sharing memory: each backend would write
    them in its own order (Triton, C++ and PyTorch gave three different histograms), so every backend
    refuses them here, before dispatch, with this one message."""
    if t.is_contiguous() or not _shares_memory(t):
        return
    raise ValueError(f"{what}: {name} is written in place but several of its elements share memory (shape "
                     f"{tuple(t.shape)}, strides {t.stride()}: an expanded or overlapping view), so the result "
                     f"would depend on the order of the writes; {fix}")


# ----- optimizer hyperparameters: one range check for every backend -------------------------------------
def _check_range(what: str, name: str, value: float, lo: float, hi: float | None, why: str) -> None:
    if not (math.isfinite(value) and value >= lo and (hi is None or value < hi)):
        span = f"in [{lo:g}, {hi:g})" if hi is not None else f"finite and >= {lo:g}"
        raise ValueError(f"{what}: {name} must be {span} ({why}), got {value!r}")


def check_sgd_hyperparameters(lr: float, momentum: float, dampening: float, weight_decay: float,
                              nesterov: bool) -> None:
    """torch.optim.SGD's ranges, plus finiteness (an inf or NaN rate would only poison every weight)."""
    what = "masked_sgd_"
    _check_range(what, "lr", lr, 0.0, None, "the learning rate")
    _check_range(what, "momentum", momentum, 0.0, None, "as torch.optim.SGD")
    _check_range(what, "weight_decay", weight_decay, 0.0, None, "as torch.optim.SGD")
    if not math.isfinite(dampening):
        raise ValueError(f"{what}: dampening must be finite, got {dampening!r}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"{what}: nesterov=True needs momentum > 0 and dampening == 0 (as torch.optim.SGD), got "
                         f"momentum={momentum!r}, dampening={dampening!r}")


def check_adamw_hyperparameters(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """torch.optim.AdamW's ranges, plus finiteness. beta = 1 is refused: the bias correction
    1 - beta**step is then 0 (a ZeroDivisionError in Python, inf/NaN weights in a kernel)."""
    what = "masked_adamw_"
    _check_range(what, "lr", lr, 0.0, None, "the learning rate")
    _check_range(what, "beta1", beta1, 0.0, 1.0, "1 would make the bias correction 1 - beta1**step zero")
    _check_range(what, "beta2", beta2, 0.0, 1.0, "1 would make the bias correction 1 - beta2**step zero")
    _check_range(what, "eps", eps, 0.0, None, "as torch.optim.AdamW")
    _check_range(what, "weight_decay", weight_decay, 0.0, None, "as torch.optim.AdamW")
