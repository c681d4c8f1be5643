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

from .algebra import COMPOSED_CONVS, _set, compose_kernels64, conv_merge_blocker, merge_conv_conv

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


# ----- the module -------------------------------------------------------------------------------
class BorderCorrectedConv(nn.Module):
    """``second(first(x))`` for two zero-padded convs: one composed conv plus an exact border fix.

    Math (per spatial dim). Let y_e be the first conv evaluated on the extended grid
    t ∈ [−p2, H1 + p2) of intermediate positions (input zero-padded as far as needed). The composed
    conv (kernel K = k1 + s1·(k2−1), stride s1·s2, padding P = p1 + s1·p2) computes exactly
    ``second_without_padding(y_e)``, while the true result is ``second_without_padding(y_e · 1_inside)``.
    The difference is linear in the ring R = y_e · (1 − 1_inside), so::

        out = composed(x) − Σ_{dims d, sides} conv(R_side, W2, stride=s2)

    where the ring is split into disjoint strips (for dim d: positions before 0 / from H1 on along d,
    inside along the dims before d, anywhere along the dims after d). For each strip only the output
    positions whose window touches it (⌈p2/s2⌉ rows at the start, the rows reaching past H1 at the
    end, leftover rows from non-divisible sizes included) are corrected, with only the kernel taps
    that can reach it; y_e is evaluated only on the strip positions those outputs read.

    Two modes:

    * ``"bias"`` — when k1 ≤ p1 + 1 wherever the second conv pads (e.g. a pointwise first conv), the
      ring only sees zero padding, so y_e = b1 there and the correction is batch-independent:
      a 1-channel ring indicator strip convolved with ``ring_weight`` Wb[o,0,v] = Σ_m W2[o,m,v]·b1[m].
    * ``"full"`` — otherwise: the first conv (``first_weight``, ``first_bias``) is run on the input
      strips under the ring and the second conv's taps (``second_weight``) on the result. A strip
      whose input window is all padding (e.g. the top/left ring of a stride-2 first conv) is just
      b1 and is computed once per batch.

    Cost: the correction touches O(perimeter) positions. Per sample, in "full" mode it evaluates the
    first conv at ≈ Σ_d 2·p2·(H1_⊥ + 2p2) ring positions and the second conv, with ≤ min(k2, p2) taps
    along the corrected dim, at ≈ Σ_d 2·⌈p2/s2⌉·H2_⊥ output positions; "bias" mode is cheaper still
    (one input channel, once per batch). The composed conv itself costs C·O/g·∏K MACs per output.

    Attributes mirror a conv (``weight``, ``bias``, ``stride``, ``padding``, ``kernel_size``,
    ``in_channels``, ``out_channels``, ``groups``, ``dilation``, ``padding_mode``) and describe the
    composed conv. The correction tensors are a snapshot of the original convs: train the composed
    ``weight`` alone and the module stops being exact (it is meant for inference).
    """

    def __init__(self, dims: int, in_channels: int, out_channels: int, kernel_size, stride, padding, groups: int,
                 mode: str, first: dict, second: dict, device=None, dtype=None):
        super().__init__()
        if dims not in _CONV:
            raise ValueError(f"dims must be 1 or 2, got {dims}")
        if mode not in ("bias", "full"):
            raise ValueError(f"mode must be 'bias' or 'full', got {mode!r}")
        factory = dict(device=device, dtype=dtype)
        self.dims, self.mode, self.groups = dims, mode, groups
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(int(k) for k in kernel_size)
        self.stride = tuple(int(s) for s in stride)
        self.padding = tuple(int(p) for p in padding)
        self.dilation = (1,) * dims
        self.padding_mode = "zeros"
        self.first, self.second = _copy(first), _copy(second)
        self.weight = nn.Parameter(torch.zeros((out_channels, in_channels // groups) + self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.zeros(out_channels, **factory))
        k1, k2 = tuple(self.first["kernel_size"]), tuple(self.second["kernel_size"])
        mid = self.first["out_channels"]
        if mode == "bias":
            self.register_buffer("ring_weight", torch.zeros((out_channels, 1) + k2, **factory))
        else:
            self.register_buffer("first_weight", torch.zeros((mid, in_channels // self.first["groups"]) + k1,
                                                              **factory))
            self.register_buffer("first_bias", torch.zeros(mid, **factory))
            self.register_buffer("second_weight", torch.zeros((out_channels, mid // self.second["groups"]) + k2,
                                                               **factory))

    # -- construction / recipe ----------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_convs(cls, first: Conv, second: Conv) -> BorderCorrectedConv:
        """The exact merge of ``second(first(x))`` (use :func:`merge_padded`, which also returns a
        plain conv when no correction is needed)."""
        reason = merge_padded_blocker(first, second)
        if reason:
            raise ValueError(reason)
        kernel, bias, g = _compose64(first, second)
        p1, p2 = _padding(first), _padding(second)
        mode = "bias" if _bias_only_ring(first, second) else "full"
        ref = first.weight
        new = cls(dims=_dims(first), in_channels=first.in_channels, out_channels=second.out_channels,
                  kernel_size=tuple(kernel.shape[2:]), stride=[a * b for a, b in zip(first.stride, second.stride)],
                  padding=[a + s * b for a, s, b in zip(p1, first.stride, p2)], groups=g, mode=mode,
                  first=dict(out_channels=first.out_channels, kernel_size=list(first.kernel_size),
                             stride=list(first.stride), padding=list(p1), groups=first.groups),
                  second=dict(kernel_size=list(second.kernel_size), stride=list(second.stride), padding=list(p2),
                              groups=second.groups),
                  device=ref.device, dtype=ref.dtype)
        new.weight.copy_(kernel.to(ref.dtype))
        new.bias.copy_(bias.to(ref.dtype))
        new.weight.requires_grad_(ref.requires_grad)
        new.bias.requires_grad_(ref.requires_grad)
        if mode == "bias":
            new.ring_weight.copy_(_ring_weight64(first, second).to(ref.dtype))
        else:
            new.first_weight.copy_(first.weight.detach().to(ref.dtype))
            if first.bias is not None:
                new.first_bias.copy_(first.bias.detach().to(ref.dtype))
            new.second_weight.copy_(second.weight.detach().to(ref.dtype))
        return new

    def recipe_kwargs(self) -> dict:
        """JSON-able constructor arguments (``cls(**kwargs)`` builds an empty module with the same
        state_dict keys and shapes)."""
        return dict(dims=self.dims, in_channels=self.in_channels, out_channels=self.out_channels,
                    kernel_size=list(self.kernel_size), stride=list(self.stride), padding=list(self.padding),
                    groups=self.groups, mode=self.mode, first=_copy(self.first), second=_copy(self.second))

    @classmethod
    def from_recipe_kwargs(cls, kwargs: dict) -> BorderCorrectedConv:
        return cls(**kwargs)

    to_kwargs = recipe_kwargs
    from_kwargs = from_recipe_kwargs

    # -- forward ------------------------------------------------------------------------------
    def _first_on_box(self, x: torch.Tensor, box: list[tuple[int, int]]) -> torch.Tensor:
        """The first conv's response at intermediate positions box[d] = [a, b) per dim, the input
        being zero outside its bounds (shape-only Python)."""
        conv = _CONV[self.dims][1]
        k1, s1, p1 = self.first["kernel_size"], self.first["stride"], self.first["padding"]
        pads: list[int] = []
        for d, (a, b) in enumerate(box):
            start, end = s1[d] * a - p1[d], s1[d] * (b - 1) - p1[d] + k1[d]
            size = x.shape[2 + d]
            lo, hi = min(max(start, 0), size), max(min(end, size), 0)
            if hi <= lo:            # the strip sees zero padding only: the response is the bias,
                # the same for every sample (a batch of one, broadcast when subtracted)
                shape = (1, self.first_bias.shape[0]) + tuple(b - a for a, b in box)
                bias = self.first_bias.to(x.dtype).view((1, -1) + (1,) * self.dims)
                return bias.expand(shape)
            x = x.narrow(2 + d, lo, hi - lo)
            pads = [lo - start, end - hi] + pads
        if any(pads):
            x = F.pad(x, pads)
        return conv(x, self.first_weight.to(x.dtype), self.first_bias.to(x.dtype), s1, 0, 1, self.first["groups"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = _CONV[self.dims][1]
        out = conv(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.stride, self.padding, 1, self.groups)
        k1, s1, p1 = self.first["kernel_size"], self.first["stride"], self.first["padding"]
        k2, s2, p2 = self.second["kernel_size"], self.second["stride"], self.second["padding"]
        h1 = [_out_size(x.shape[2 + d], k1[d], s1[d], p1[d]) for d in range(self.dims)]
        h2 = [_out_size(h1[d], k2[d], s2[d], p2[d]) for d in range(self.dims)]
        for d in range(self.dims):
            if p2[d] == 0:
                continue
            for side in (0, 1):
                if side == 0:      # outputs whose window starts before 0; taps v < p2 reach the ring
                    j0, j1 = 0, min(_ceil_div(p2[d], s2[d]), h2[d])
                    t0, t1 = 0, min(k2[d], p2[d])
                    ring = (-p2[d], 0)
                else:              # outputs whose window reaches H1; the last one needs the most taps
                    j0, j1 = max(0, _ceil_div(h1[d] + p2[d] - k2[d] + 1, s2[d])), h2[d]
                    t0, t1 = max(0, h1[d] + p2[d] - s2[d] * (j1 - 1)), k2[d]
                    ring = (h1[d], h1[d] + p2[d])
                if j1 <= j0:
                    continue
                need, box = [], []
                for e in range(self.dims):
                    if e == d:
                        lo, hi = s2[d] * j0 - p2[d] + t0, s2[d] * (j1 - 1) - p2[d] + t1
                        region = ring
                    else:
                        lo, hi = -p2[e], s2[e] * (h2[e] - 1) - p2[e] + k2[e]
                        region = (0, h1[e]) if e < d else (-p2[e], h1[e] + p2[e])
                    a, b = max(lo, region[0]), min(hi, region[1])
                    need.append((lo, hi))
                    box.append((a, b))
                if any(b <= a for a, b in box):
                    continue
                if self.mode == "bias":
                    strip = x.new_ones((1, 1) + tuple(b - a for a, b in box))
                    weight, groups = self.ring_weight, 1
                else:
                    strip = self._first_on_box(x, box)
                    weight, groups = self.second_weight, self.second["groups"]
                pads: list[int] = []
                for (lo, hi), (a, b) in zip(need, box):
                    pads = [a - lo, hi - b] + pads
                if any(pads):
                    strip = F.pad(strip, pads)
                weight = weight.narrow(2 + d, t0, t1 - t0).to(x.dtype)
                fix = conv(strip, weight, None, s2, 0, 1, groups)
                out.narrow(2 + d, j0, j1 - j0).sub_(fix)
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, mode={self.mode!r}, "
                f"first_kernel={tuple(self.first['kernel_size'])}, second_padding={tuple(self.second['padding'])}")


COMPOSED_CONVS.append(BorderCorrectedConv)  # skips and parallel branches may be added into its kernel


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
    return BorderCorrectedConv.from_convs(first, second)
