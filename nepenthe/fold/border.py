"""Merging two convs when the second one zero-pads: composed kernel plus an exact border correction.

:func:`nepenthe.fold.algebra.merge_conv_conv` merges ``second(first(x))`` into one conv only when
``second`` has no padding. When it pads, the composed kernel reads the first conv's *extended*
response on the ring of "virtual" intermediate positions that ``second`` zero-pads, so it is wrong
at the output borders. :func:`merge_padded` returns the composed conv together with an exact
correction that subtracts the ring's contribution (:class:`BorderCorrectedConv`), or a plain conv
when the ring contributes nothing.

Notation per spatial dimension: the first conv has kernel k1, stride s1, padding p1 (input L,
output H1); the second has k2, s2, p2 (output H2). The composed conv has kernel K = k1 + s1·(k2−1),
stride s1·s2 and padding P = p1 + s1·p2, and produces exactly H2 positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .algebra import _set, compose_kernels64, conv_merge_blocker, merge_conv_conv

__all__ = ["Conv", "merge_padded", "merge_padded_blocker"]

Conv = nn.Conv1d | nn.Conv2d

_CONV = {1: (nn.Conv1d, F.conv1d), 2: (nn.Conv2d, F.conv2d)}


# ----- geometry ---------------------------------------------------------------------------------
def _dims(m: nn.Module) -> int | None:
    if isinstance(m, nn.Conv1d):
        return 1
    if isinstance(m, nn.Conv2d):
        return 2
    return None


def _padding(m: Conv) -> tuple[int, ...] | None:
    """Numeric per-dimension padding of ``m`` ('valid' and odd-kernel 'same' resolved), or None
    when torch would pad asymmetrically ('same' with an even kernel)."""
    if not isinstance(m.padding, str):
        return tuple(int(p) for p in m.padding)
    if m.padding == "valid":
        return (0,) * len(m.kernel_size)
    if any((k - 1) % 2 for k in m.kernel_size):
        return None
    return tuple((k - 1) // 2 for k in m.kernel_size)


def _out_size(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def merge_padded_blocker(first: nn.Module, second: nn.Module) -> str | None:
    """Why :func:`merge_padded` cannot merge ``second(first(x))``, or None when it can."""
    d1, d2 = _dims(first), _dims(second)
    if d1 is None or d2 is None:
        return (f"merge_padded merges nn.Conv1d/nn.Conv2d pairs only, got {type(first).__name__} and "
                f"{type(second).__name__}")
    if d1 != d2:
        return f"cannot merge a {type(first).__name__} with a {type(second).__name__}: dimensions differ"
    for name, m in (("first", first), ("second", second)):
        if any(d != 1 for d in m.dilation):
            return f"the {name} conv is dilated (dilation={tuple(m.dilation)}); only dilation 1 is supported"
        if m.padding_mode != "zeros":
            return f"the {name} conv uses padding_mode={m.padding_mode!r}; only zero padding ('zeros') is supported"
        if _padding(m) is None:
            return f"the {name} conv uses padding='same' with an even kernel (asymmetric padding)"
    if first.out_channels != second.in_channels:
        return (f"the first conv has {first.out_channels} output channels but the second reads "
                f"{second.in_channels}")
    return None


def _bias_only_ring(first: Conv, second: Conv) -> bool:
    """True when, for every input size, the first conv sees only zero padding at every ring position
    (so its response there is its bias): k1 ≤ p1 + 1 in every dimension the second conv pads."""
    p1, p2 = _padding(first), _padding(second)
    return all(k <= p + 1 for k, p, q in zip(first.kernel_size, p1, p2) if q > 0)


# ----- float64 composition ----------------------------------------------------------------------
def _block_dense(w: torch.Tensor, groups: int, target_groups: int, in_channels: int) -> torch.Tensor:
    """A grouped weight (out, in/groups, k…) rewritten for ``target_groups`` (a divisor of ``groups``):
    (out, in/target_groups, k…), zero outside the original blocks."""
    if groups == target_groups:
        return w
    out = w.shape[0]
    og, ig = out // groups, in_channels // groups
    osup, isup = out // target_groups, in_channels // target_groups
    dense = w.new_zeros((out, isup) + tuple(w.shape[2:]))
    for c in range(groups):
        a = (c * og) // osup
        offset = c * ig - a * isup
        dense[c * og:(c + 1) * og, offset:offset + ig] = w[c * og:(c + 1) * og]
    return dense


def _ring_weight64(first: Conv, second: Conv) -> torch.Tensor:
    """Wb[o, 0, v] = Σ_m W2[o, m, v] · b1[m] (float64): the second conv's response to the first
    conv's bias, per kernel tap."""
    w2 = second.weight.detach().to(torch.float64)
    if first.bias is None:
        return w2.new_zeros((w2.shape[0], 1) + tuple(w2.shape[2:]))
    b1 = first.bias.detach().to(torch.float64).to(w2.device)
    g2, out = second.groups, w2.shape[0]
    group_of = torch.arange(out, device=w2.device) // (out // g2)
    b1g = b1.view(g2, -1)[group_of]                                   # (O, M/g2)
    return (w2 * b1g.view(b1g.shape + (1,) * (w2.dim() - 2))).sum(1, keepdim=True)


def _compose64(first: Conv, second: Conv) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Composed kernel (O, C/g, K…), bias (O,) in float64, and groups g = gcd(g1, g2)."""
    w1, w2 = first.weight.detach().to(torch.float64), second.weight.detach().to(torch.float64).to(first.weight.device)
    g1, g2 = first.groups, second.groups
    g = math.gcd(g1, g2)
    c, m, o = first.in_channels, first.out_channels, second.out_channels
    w1 = _block_dense(w1, g1, g, c)                                   # (M, C/g, k1)
    w2 = _block_dense(w2, g2, g, m)                                   # (O, M/g, k2)
    k2 = tuple(w2.shape[2:])
    # The O/g output channels of each super-group form the batch; the super-groups are conv groups.
    inp = w2.reshape((g, o // g, m // g) + k2).transpose(0, 1).reshape((o // g, m) + k2)
    kernel = compose_kernels64(inp, w1, first.stride, groups=g)  # (O/g, C, K)
    big_k = tuple(kernel.shape[2:])
    kernel = kernel.reshape((o // g, g, c // g) + big_k).transpose(0, 1).reshape((o, c // g) + big_k)
    bias = _ring_weight64(first, second).flatten(1).sum(1)
    if second.bias is not None:
        bias = bias + second.bias.detach().to(torch.float64).to(bias.device)
    return kernel, bias, g


def _plain(first: Conv, kernel: torch.Tensor, bias: torch.Tensor, groups: int, stride, padding) -> Conv:
    ref = first.weight
    new = _CONV[_dims(first)][0](first.in_channels, kernel.shape[0], tuple(kernel.shape[2:]), stride=stride,
                                 padding=padding, groups=groups, bias=True, device=ref.device, dtype=ref.dtype)
    return _set(new, kernel, bias)


def _copy(spec: dict) -> dict:
    return {key: ([int(i) for i in v] if isinstance(v, (list, tuple)) else v) for key, v in spec.items()}


# ----- entry point ------------------------------------------------------------------------------
@torch.no_grad()
def merge_padded(first: nn.Module, second: nn.Module) -> nn.Module:
    """``second(first(x))`` as one composed conv, exact at the borders even when ``second`` zero-pads.

    Returns a plain ``nn.Conv1d``/``nn.Conv2d`` (kernel k1 + s1·(k2−1), stride s1·s2, padding
    p1 + s1·p2, groups gcd(g1, g2)) when the ring the second conv zero-pads contributes nothing —
    second has no padding, or the first conv only sees padding there (pointwise, …) and has no
    bias — and a :class:`BorderCorrectedConv` otherwise. Raises ``ValueError`` for unsupported pairs
    (see :func:`merge_padded_blocker`). Computes in float64, stores in the first conv's dtype.
    """
    reason = merge_padded_blocker(first, second)
    if reason:
        raise ValueError(reason)
    if conv_merge_blocker(first, second) is None:
        return merge_conv_conv(first, second)
    p1, p2 = _padding(first), _padding(second)
    no_ring = all(p == 0 for p in p2)
    bias_free = first.bias is None or not bool(first.bias.detach().any())
    if no_ring or (bias_free and _bias_only_ring(first, second)):
        kernel, bias, g = _compose64(first, second)
        return _plain(first, kernel, bias, g, tuple(a * b for a, b in zip(first.stride, second.stride)),
                      tuple(a + s * b for a, s, b in zip(p1, first.stride, p2)))
    from .modules import BorderCorrectedConv  # here: modules imports this file's helpers

    return BorderCorrectedConv.from_convs(first, second)
