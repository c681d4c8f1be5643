"""Every ``nn.Module`` a folded graph may contain besides PyTorch's own: what the passes put in
place of removed parts, and what recipes rebuild (:mod:`nepenthe.fold.registry`).

* :class:`ConstantChannels` — the output of an emptied Conv/Linear (its bias, broadcast);
* :class:`ChannelAffine` — a linearized rectifier that could not be absorbed (slope · x + offset);
* :class:`ChannelOffset` — constant additions collapsed into one per-channel offset;
* :class:`BorderCorrectedConv` — two zero-padded convs composed into one, exact at the borders;
* :class:`StateRectifier` — a rectifier with some neurons forced to fixed affine maps (the
  preview of folding in :mod:`nepenthe.fold.preview`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..activations import Rectifier
from . import algebra
from .algebra import output_size
from .border import (
    _CONV,
    Conv,
    _bias_only_ring,
    _ceil_div,
    _compose64,
    _copy,
    _dims,
    _out_size,
    _padding,
    _ring_weight64,
    merge_padded_blocker,
)

__all__ = ["BorderCorrectedConv", "ChannelAffine", "ChannelOffset", "ConstantChannels", "StateRectifier"]


class ConstantChannels(nn.Module):
    """The output of an emptied Conv/Linear (all weights zero): its bias, one value per channel,
    broadcast to the shape the op would have produced.

    ``geometry`` lists, per conv/pool between ``source`` (the tensor this module reads, only for
    its shape) and the emptied op's output, its (kernel, stride, padding) per spatial dim; the
    ops before the emptied one are not computed at all. The result is an expanded view (no copy).
    """

    def __init__(self, value: torch.Tensor, channel_dim: int, geometry: list[list[list[int]]]):
        super().__init__()
        self.channel_dim = channel_dim
        self.geometry = [[list(map(int, g)) for g in step] for step in geometry]
        self.register_buffer("value", value.detach().clone())

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        if self.channel_dim == -1:  # Linear: the last dim becomes the channels
            shape = list(source.shape[:-1]) + [self.value.numel()]
            return self.value.expand(shape)
        spatial = list(source.shape[2:])
        for step in self.geometry:
            spatial = [output_size(n, k, s, p) for n, (k, s, p) in zip(spatial, step)]
        shape = [source.shape[0], self.value.numel()] + spatial
        return self.value.view([1, -1] + [1] * len(spatial)).expand(shape)

    def extra_repr(self) -> str:
        return f"channels={self.value.numel()}, channel_dim={self.channel_dim}, geometry={self.geometry}"


class ChannelAffine(nn.Module):
    """y = slope · x + offset per channel: a linearized rectifier that could not be absorbed."""

    def __init__(self, slope: torch.Tensor, offset: torch.Tensor, channel_dim: int = 1):
        super().__init__()
        self.channel_dim = channel_dim
        self.register_buffer("slope", slope.detach().clone())
        self.register_buffer("offset", offset.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.channel_dim % x.dim()
        shape = [1] * x.dim()
        shape[dim] = -1
        return x * self.slope.to(x.dtype).view(shape) + self.offset.to(x.dtype).view(shape)

    def extra_repr(self) -> str:
        return f"channels={self.slope.numel()}, channel_dim={self.channel_dim}"


class ChannelOffset(nn.Module):
    """y = x + offset per channel: constant additions collapsed into one op (``x + c1 + c2 + …``
    with per-channel constants c_k, e.g. residual branches emptied by pruning)."""

    def __init__(self, offset: torch.Tensor, channel_dim: int = 1):
        super().__init__()
        self.channel_dim = channel_dim
        self.register_buffer("offset", offset.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_dim % x.dim()] = -1
        return x + self.offset.view(shape)

    def extra_repr(self) -> str:
        return f"channels={self.offset.numel()}, channel_dim={self.channel_dim}"


class StateRectifier(nn.Module):
    """A rectifier with some neurons replaced by fixed affine maps: ``where(keep, φ(z), slope·z + offset)``."""

    def __init__(self, rect: Rectifier, keep: torch.Tensor, slope: torch.Tensor, offset: torch.Tensor,
                 channel_dim: int):
        super().__init__()
        self.rect = rect
        self.channel_dim = channel_dim
        self.register_buffer("keep", keep.clone())
        self.register_buffer("slope", slope.clone())
        self.register_buffer("offset", offset.clone())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        shape = [1] * z.dim()
        shape[self.channel_dim % z.dim()] = -1
        affine = z * self.slope.to(z.dtype).view(shape) + self.offset.to(z.dtype).view(shape)
        return torch.where(self.keep.view(shape), self.rect.apply(z), affine)


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


algebra.COMPOSED_CONVS.append(BorderCorrectedConv)  # skips and parallel branches may be added into its kernel
