"""``nepenthe::sign_histogram`` and ``nepenthe::accumulate_sign_histogram_``: per-channel counts of
the sign states (ON, OFF, ZERO, SAT[, NONFINITE]) of a tensor, on the backend chosen per call."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op

from ._args import _check_bins, _check_hist, _check_input, _contiguous_hist, _plain_eager, as_3d
from .backends import select

__all__ = ["accumulate_sign_histogram_", "sign_histogram"]


def _sign_histogram_impl(x: Tensor, channel_dim: int, upper: float | None, bins: int) -> Tensor:
    x3 = as_3d(x, channel_dim)
    hist = torch.zeros(x3.shape[1], bins, dtype=torch.int64, device=x.device)
    _, impl = select("sign_histogram", x.device, (x.dtype,))
    impl.sign_histogram_(hist, x3, upper)
    return hist


# The undecorated function runs plain eager calls directly (see _plain_eager).


_sign_histogram = custom_op("nepenthe::sign_histogram",
                            mutates_args=())(_sign_histogram_impl)


@_sign_histogram.register_fake
def _(x, channel_dim, upper, bins):
    return x.new_empty((x.shape[channel_dim], bins), dtype=torch.int64)


def _accumulate_sign_histogram_impl(hist: Tensor, x: Tensor, channel_dim: int, upper: float | None) -> None:
    buf, temporary = _contiguous_hist(hist)
    _, impl = select("sign_histogram", x.device, (x.dtype,))
    impl.sign_histogram_(buf, as_3d(x, channel_dim), upper)
    if temporary:
        hist += buf


# The undecorated function runs plain eager calls directly (see _plain_eager).


_accumulate_sign_histogram = custom_op("nepenthe::accumulate_sign_histogram_",
                                       mutates_args=("hist",))(_accumulate_sign_histogram_impl)


@_accumulate_sign_histogram.register_fake
def _(hist, x, channel_dim, upper):
    return None


def sign_histogram(x: Tensor, channel_dim: int = 1, upper: float | None = None, bins: int = 4) -> Tensor:
    """Per-channel counts of the sign states of ``x`` as ``int64[C, bins]`` (ON, OFF, ZERO, SAT[, NONFINITE]).

    ``channel_dim`` is the neuron dimension (1 for N×C×H×W conv outputs, also channels_last; -1
    for Linear/token layers); every other dimension holds observations. ``upper`` is the
    rectifier's upper kink (6.0 for ReLU6) or None, in which case SAT is 0. ``bins=5`` adds the
    count of NaN/±Inf values. Runs on the fastest backend for the tensor's device.
    """
    _check_input(x, channel_dim, "sign_histogram")
    _check_bins(bins, "sign_histogram")
    op = _sign_histogram_impl if _plain_eager(x) else _sign_histogram
    return op(x.detach(), channel_dim, None if upper is None else float(upper), bins)


def accumulate_sign_histogram_(hist: Tensor, x: Tensor, channel_dim: int = 1, upper: float | None = None) -> Tensor:
    """Add the sign histogram of ``x`` into ``hist`` (int64[C, 4] or [C, 5]) in place and return it."""
    channels = _check_input(x, channel_dim, "accumulate_sign_histogram_")
    _check_hist(hist, channels, x.device, "accumulate_sign_histogram_")
    op = _accumulate_sign_histogram_impl if _plain_eager(x, hist) else _accumulate_sign_histogram
    op(hist, x.detach(), channel_dim, None if upper is None else float(upper))
    return hist
