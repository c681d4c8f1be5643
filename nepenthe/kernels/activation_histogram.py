"""Triton fused activation + sign histogram: ``y = φ(x)`` and the counts of ``x``, reading ``x`` once.

Same tiling, launch plan and packed counters as :mod:`.sign_histogram` (a program owns a channel
block and walks ``[BLOCK_C, BLOCK_N]`` tiles over the observations, the stride-1 axis is a constexpr
so both NCHW and channels_last read and write contiguously); each tile is loaded once, counted,
mapped through φ in fp32 (fp64 for fp64 input) and stored with ``y``'s own strides. ``y`` may be the
very memory of ``x`` (an inplace activation): each element is read before it is written by the same
program. ``KIND`` (index into ``ACTIVATIONS``) is a constexpr: one specialisation per activation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.constants import ACTIVATIONS
from .sign_histogram import (
    ALIGNED_TILE_ARGS,
    GPU_NUM_WARPS,
    GPU_TILES_BY_UNIT,
    KERNEL_DTYPES,
    TL_DTYPES,
    UNIT_NAMES,
    UNITS,
    _axis_offsets,
    _check_hist,
    _count_tile,
    _div_rn,
    _double_bits,
    _flush_counts,
    _scalar_from_bits,
    _tile_coords,
    _tile_signature,
    _upcast,
    _upper_bits_for,
    plan,
)


@triton.jit
def activation(x, slope, KIND: tl.constexpr):
    """φ(x) with PyTorch's formulas; ``x`` already upcast; NaN propagates as in PyTorch. At -inf the
    limit (the rule of every backend, ``reference.activation``): gelu, gelu_tanh, silu and hardswish
    take -inf as -FLT_MAX, which their formulas map to -0.0 (-inf would give -inf * 0 = NaN)."""
    if KIND >= 3:
        x = tl.where(x < -3.4028234663852886e38, -3.4028234663852886e38, x)
    if KIND == 0:  # relu
        y = tl.where(x < 0, 0.0, x)
    elif KIND == 1:  # relu6 = hardtanh(x, 0, 6)
        y = tl.where(x < 0, 0.0, tl.where(x > 6.0, 6.0, x))
    elif KIND == 2:  # leaky_relu
        y = tl.where(x > 0, x, x * slope)
    elif KIND == 3:  # gelu (erf): x/2 (1 + erf(x/√2))
        y = x * 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif KIND == 4:  # gelu (tanh): x/2 (1 + tanh(u)) = x·sigmoid(2u), u = √(2/π)(x + 0.044715 x³)
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = _div_rn(x, 1.0 + tl.exp(-2.0 * u))
    elif KIND == 5:  # silu
        y = _div_rn(x, 1.0 + tl.exp(-x))
    else:  # hardswish: x · min(max(x + 3, 0), 6) / 6
        t = x + 3.0
        t = tl.where(t < 0, 0.0, tl.where(t > 6.0, 6.0, t))
        y = _div_rn(x * t, 6.0)
    return y


@triton.jit
def activation_histogram_kernel(x_ptr, y_ptr, hist_ptr, C, N, sx_o, sx_c, sx_n, sy_o, sy_c, sy_n,
                                n_cblocks, n_nblocks, n_tiles, tiles_per_prog, upper_bits, has_sat, bins, slope_bits,
                                BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, UNIT: tl.constexpr,
                                KIND: tl.constexpr):
    c, t_first = _tile_coords(tl.program_id(0), n_cblocks, tiles_per_prog, BLOCK_C)
    cmask = c < C
    xc_off = _axis_offsets(c, sx_c, UNIT == 1)
    yc_off = _axis_offsets(c, sy_c, UNIT == 1)
    like = _upcast(tl.full((), 0, x_ptr.dtype.element_ty))
    upper = _scalar_from_bits(upper_bits, like)
    slope = _scalar_from_bits(slope_bits, like)
    acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.int32)
    for i in range(0, tiles_per_prog):  # the last program's run may pass n_tiles: those tiles are masked off
        t = t_first + i
        o = t // n_nblocks
        n = (t - o * n_nblocks) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = cmask[:, None] & ((n < N) & (t < n_tiles))[None, :]
        x_offs = o * sx_o + xc_off[:, None] + _axis_offsets(n, sx_n, UNIT == 2)[None, :]
        y_offs = o * sy_o + yc_off[:, None] + _axis_offsets(n, sy_n, UNIT == 2)[None, :]
        x = _upcast(tl.load(x_ptr + x_offs, mask=mask, other=0.0))
        acc = _count_tile(x, mask, upper, acc)
        y = activation(x, slope, KIND)
        tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    _flush_counts(hist_ptr, c, cmask, bins, has_sat, acc)


def activation_histogram_(x3: torch.Tensor, y3: torch.Tensor, hist: torch.Tensor, kind: int,
                          negative_slope: float, upper: float | None) -> None:
    """Backend function: ``y3 = φ(x3)`` and the counts of ``x3`` added into ``hist``, one read of ``x3``."""
    if x3.dtype not in KERNEL_DTYPES:
        raise TypeError(f"activation_histogram_: no Triton kernel for {x3.dtype}")
    if y3.shape != x3.shape or y3.dtype != x3.dtype or y3.device != x3.device:
        raise ValueError(f"y3 must match x3 in shape, dtype and device: {tuple(y3.shape)} {y3.dtype} vs "
                         f"{tuple(x3.shape)} {x3.dtype}")
    kind = int(kind)
    if not 0 <= kind < len(ACTIVATIONS):
        raise ValueError(f"activation kind {kind} out of range 0..{len(ACTIVATIONS) - 1}")
    _check_hist(hist, x3)
    p = plan(x3, y3)
    if p is None:
        return
    bits, has_sat = _upper_bits_for(upper, x3.dtype)
    activation_histogram_kernel[p.grid](
        x3, y3, hist, p.C, p.N, *p.x_strides, *p.y_strides, p.n_cblocks, p.n_nblocks, p.n_tiles, p.tiles_per_prog,
        bits, has_sat, hist.shape[1], _double_bits(negative_slope),
        BLOCK_C=p.block_c, BLOCK_N=p.block_n, UNIT=p.unit, KIND=kind, num_warps=p.num_warps)


def aot_specializations():
    """(name, kernel, signature, constexprs, options, aligned args) of every specialisation the GPU launcher
    can produce."""
    for dname in TL_DTYPES.values():
        for kind, kname in enumerate(ACTIVATIONS):
            for unit in UNITS:
                for bc, bn in GPU_TILES_BY_UNIT[unit]:
                    sig = _tile_signature(dname, with_y=True)
                    sig.update(slope_bits="i64", BLOCK_C="constexpr", BLOCK_N="constexpr", UNIT="constexpr",
                               KIND="constexpr")
                    yield (f"activation_histogram[{kname},{dname},unit={UNIT_NAMES[unit]},{bc}x{bn}]",
                           activation_histogram_kernel, sig, {"BLOCK_C": bc, "BLOCK_N": bn, "UNIT": unit, "KIND": kind},
                           {"num_warps": GPU_NUM_WARPS}, [a for a in ALIGNED_TILE_ARGS if a in sig])


__all__ = ["ACTIVATIONS", "activation", "activation_histogram_", "activation_histogram_kernel", "aot_specializations"]
