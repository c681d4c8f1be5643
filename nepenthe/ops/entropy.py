"""``nepenthe::entropy_from_histogram``: per-neuron and layer entropies of a sign histogram (docs/method.md §1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.library import custom_op

from .constants import AGGREGATES, OFF, ON, SAT, ZERO, ZERO_AS

__all__ = ["aggregate_layer_entropy", "aggregate_layer_entropy_tensor", "binary_entropy", "entropy_from_histogram",
           "entropy_math", "neuron_entropy_from_histogram", "state_counts"]


# ----- the math (production; the op below wraps it) ------------------------------------------------
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

    Without an upper kink this is the binary entropy of p = ON / (ON + OFF) of docs/method.md §1. With a
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


def entropy_math(hist: torch.Tensor, zero_as: str = "exclude",
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


# ----- the op ---------------------------------------------------------------------------------------
@custom_op("nepenthe::entropy_from_histogram", mutates_args=())
def _entropy_from_histogram(hist: Tensor, zero_as: str, aggregate: str) -> tuple[Tensor, Tensor]:
    # Deliberately no kernel: the input is a [C, 4] count table, a few microseconds of PyTorch math.
    return entropy_math(hist, zero_as, aggregate)


@_entropy_from_histogram.register_fake
def _(hist, zero_as, aggregate):
    return hist.new_empty(hist.shape[0], dtype=torch.float64), hist.new_empty((), dtype=torch.float64)


def entropy_from_histogram(hist: Tensor, zero_as: str = "exclude", aggregate: str = "mean") -> tuple[Tensor, Tensor]:
    """(per-neuron entropy float64[C], layer entropy float64 scalar tensor) of a sign histogram (docs/method.md §1).

    ``zero_as``: "exclude" (paper), "off" (EGP) or "on" (EASIER); ``aggregate``: "mean",
    "mixed_mean" (EGP) or "sum".
    """
    if zero_as not in ZERO_AS:
        raise ValueError(f"zero_as must be one of {ZERO_AS}, got {zero_as!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if not isinstance(hist, Tensor) or hist.dim() != 2 or hist.shape[1] < 4 or hist.is_floating_point():
        got = f"{hist.dtype}{list(hist.shape)}" if isinstance(hist, Tensor) else type(hist).__name__
        raise ValueError(f"entropy_from_histogram: expected an integer histogram [C, 4] (ON, OFF, ZERO, SAT), "
                         f"got {got}")
    return _entropy_from_histogram(hist, zero_as, aggregate)
