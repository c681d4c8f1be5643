"""Layer 1: the numerical ops of NEPENTHE, pure-PyTorch reference implementations.

Everything above this module (statistics, pruning, folding) calls these functions and nothing
lower, so that fused backends (Triton, CUDA C++, C++ CPU) can replace the bodies later without any
caller changing. The reference versions here are also the test oracle for those backends.

Histogram layout: ``int64[C, 4]`` with columns ``ON, OFF, ZERO, SAT`` (see SPEC §1):

* ON   z > 0
* OFF  z < 0
* ZERO z == 0
* SAT  z >= upper (only when the rectifier has an upper kink, e.g. 6 for ReLU6); SAT is a subset
  of ON, counted in addition to it.

NaN compares false with everything, so a NaN is counted in no column; callers that must refuse
non-finite activations check ``torch.isfinite`` themselves (see ``nepenthe.entropy``).
"""

from __future__ import annotations

import math

import torch

ON, OFF, ZERO, SAT = 0, 1, 2, 3
NUM_STATES = 4
STATE_NAMES = ("on", "off", "zero", "sat")

ZERO_AS = ("exclude", "off", "on")
AGGREGATES = ("mean", "mixed_mean", "sum")


def _channels_first_2d(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """View ``x`` as ``[C, everything else]`` (copies only when the layout requires it)."""
    if x.dim() == 0:
        raise ValueError("sign_histogram needs a tensor with at least one dimension, got a scalar")
    channel_dim = channel_dim % x.dim()
    channels = x.shape[channel_dim]
    # explicit column count: reshape(0, -1) is ambiguous and raises for a layer with zero channels
    return x.movedim(channel_dim, 0).reshape(channels, x.numel() // channels if channels else 0)


def sign_histogram(x: torch.Tensor, channel_dim: int = 1, upper: float | None = None) -> torch.Tensor:
    """Per-channel counts of the sign states of ``x`` as ``int64[C, 4]`` (ON, OFF, ZERO, SAT).

    ``channel_dim`` is the neuron dimension (1 for N×C×H×W conv outputs, -1 for Linear/token
    layers); every other dimension holds observations. ``upper`` is the rectifier's upper kink
    (6.0 for ReLU6) or None when it has none, in which case SAT is 0.
    """
    z = _channels_first_2d(x.detach(), channel_dim)
    hist = torch.zeros(z.shape[0], NUM_STATES, dtype=torch.int64, device=x.device)
    hist[:, ON] = (z > 0).sum(dim=1)
    hist[:, OFF] = (z < 0).sum(dim=1)
    hist[:, ZERO] = (z == 0).sum(dim=1)
    if upper is not None:
        hist[:, SAT] = (z >= upper).sum(dim=1)
    return hist


def accumulate_sign_histogram_(
    hist: torch.Tensor, x: torch.Tensor, channel_dim: int = 1, upper: float | None = None
) -> torch.Tensor:
    """Add the sign histogram of ``x`` into ``hist`` (int64[C, 4]) in place and return it."""
    channels = x.shape[channel_dim % x.dim()] if x.dim() else None
    if hist.dtype != torch.int64 or hist.dim() != 2 or hist.shape != (channels, NUM_STATES):
        raise ValueError(
            f"histogram buffer must be int64[{channels}, {NUM_STATES}] for an input with {channels} "
            f"channels on dim {channel_dim}, got {hist.dtype}{list(hist.shape)}"
        )
    hist += sign_histogram(x, channel_dim, upper).to(hist.device)
    return hist


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


def aggregate_layer_entropy(neuron_entropy: torch.Tensor, aggregate: str = "mean") -> float:
    """Layer entropy from per-neuron entropies: "mean" (default), "mixed_mean" (EGP) or "sum"."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if neuron_entropy.numel() == 0:
        return 0.0
    if aggregate == "sum":
        return float(neuron_entropy.sum())
    if aggregate == "mixed_mean":
        mixed = neuron_entropy[neuron_entropy > 0]
        return float(mixed.mean()) if mixed.numel() else 0.0
    return float(neuron_entropy.mean())


def entropy_from_histogram(
    hist: torch.Tensor, zero_as: str = "exclude", aggregate: str = "mean"
) -> tuple[torch.Tensor, float]:
    """(per-neuron entropy float64[C], layer entropy) of a sign histogram, SPEC §1 options."""
    neuron = neuron_entropy_from_histogram(hist, zero_as)
    return neuron, aggregate_layer_entropy(neuron, aggregate)


def binary_entropy(p: float) -> float:
    """H(p) in bits with 0·log 0 = 0 (used by tests and docs as the scalar definition)."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -p * math.log2(p) - (1.0 - p) * math.log2(1.0 - p)


_STATE_TENSOR_NAMES = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@torch.no_grad()
def apply_mask_(param: torch.Tensor, mask: torch.Tensor, state: dict | None = None) -> None:
    """Zero the masked entries of a parameter and of its per-element optimizer state in place.

    This is the reference for the fused masked optimizer steps: after it, masked weights and
    their momentum / Adam moments are exactly zero, so they stay zero through later steps.
    """
    keep = mask.to(param.dtype)
    param.mul_(keep)
    for key in _STATE_TENSOR_NAMES:
        buf = (state or {}).get(key)
        if isinstance(buf, torch.Tensor) and buf.shape == param.shape:
            buf.mul_(keep.to(buf.dtype))
