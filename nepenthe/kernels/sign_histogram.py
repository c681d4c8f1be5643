"""Triton sign histogram: per-channel ON/OFF/ZERO/SAT/NONFINITE counts of an ``[outer, C, inner]`` tensor.

Tiling. A program owns one block of ``BLOCK_C`` channels and walks a run of ``[BLOCK_C, BLOCK_N]``
tiles over the observations (``outer`` × ``inner``, ``inner`` fastest), counting each lane into one
packed int32 accumulator (five 6-bit fields, so at most 63 tiles per program); at the end it reduces
it over the observation axis and adds the per-channel totals into the int64 histogram with one
atomic per (channel, column): exact int64 counts, 64-bit indexing throughout. The launcher first
folds the layout into a canonical ``[outer, C, N]`` form (``outer`` merged into ``inner`` when the
strides allow, e.g. channels_last and ``[tokens, C]`` become ``[1, C, tokens]``), then picks the
*unit axis*: the tile dimension whose stride is 1 is a ``tl.constexpr`` (``UNIT``), so the compiler
vectorises along the channel axis (channels_last) or the observation axis (NCHW) and both layouts
read memory contiguously. Tile shapes come from a small menu (4096 lanes each), chosen to waste the
fewest lanes for the shape; the grid is sized to fill the GPU (several programs per SM).

Everything here is shared with :mod:`.activation_histogram` (same tiling, plus ``y = φ(x)``).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..ops.constants import KERNEL_DTYPES  # shared with csrc/ and ops/

UNIT_NONE, UNIT_C, UNIT_N = 0, 1, 2
UNITS = (UNIT_NONE, UNIT_C, UNIT_N)

# Packed counter: one int32 per lane holds the five counts in 6-bit fields (ON, OFF, ZERO, SAT,
# NONFINITE from the low bits up); each field gains at most 1 per tile, so a program walks at most
# FIELD_MAX tiles. One accumulator register per element instead of five keeps more loads in flight.
FIELD_BITS = 6
FIELD_MAX = (1 << FIELD_BITS) - 1

# GPU tile menu: (BLOCK_C, BLOCK_N), 4096 lanes each, 16 warps (8 elements per thread: 2 x 16-byte loads
# for fp32, 1 for bf16; 32-64 registers on sm_90, so 2-4 programs resident per SM). (64, 64) serves most layouts
# (a 64-element contiguous run on the unit axis); (4, 1024) serves few channels with many observations.
# Without a stride-1 axis (stride-0 broadcasts, strided slices) only (64, 64) is used.
GPU_TILES_BY_UNIT = {UNIT_C: ((4, 1024), (64, 64)), UNIT_N: ((4, 1024), (64, 64)), UNIT_NONE: ((64, 64),)}
GPU_NUM_WARPS = 16
PROGRAMS_PER_SM = 16
# Interpreter (CPU, TRITON_INTERPRET=1): every program instance costs milliseconds and numpy handles
# big tiles cheaply, so cover small tensors with one program of one large tile.
INTERPRETER_MAX_TILE = 16384



# ----- device helpers shared with activation_histogram -----------------------------------------------
@triton.jit
def _upcast(x):
    """fp32 compute for fp32/fp16/bf16, fp64 for fp64."""
    if x.dtype == tl.float64:
        return x
    else:
        return x.to(tl.float32)


@triton.jit
def _div_rn(a, b):
    """IEEE round-to-nearest division (Triton's ``/`` on fp32 is the approximate ``div.full``)."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt_rn(a):
    """IEEE round-to-nearest square root (``tl.sqrt`` on fp32 is approximate)."""
    if a.dtype == tl.float64:
        return tl.sqrt(a)
    else:
        return tl.sqrt_rn(a)


@triton.jit
def _scalar_from_bits(bits, like):
    """A Python float passed as the int64 bit pattern of a double (exact for fp64), in ``like``'s dtype."""
    value = bits.to(tl.int64).to(tl.float64, bitcast=True)
    if like.dtype == tl.float64:
        return value
    else:
        return value.to(tl.float32)


@triton.jit
def _count_tile(x, valid, upper, acc):
    """Add one tile of (upcast) values to the packed counter; masked lanes were loaded as 0."""
    on = (x > 0).to(tl.int32)
    off = (x < 0).to(tl.int32)
    zero = ((x == 0) & valid).to(tl.int32)
    sat = ((x >= upper) & valid).to(tl.int32)
    nonfinite = ((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32)
    return acc + (on | (off << 6) | (zero << 12) | (sat << 18) | (nonfinite << 24))


@triton.jit
def _add_column(ptr, counts, cmask):
    # counts: int32 per lane; skip the atomics of all-zero columns (SAT/NONFINITE are mostly zero)
    total = tl.sum(counts, axis=1).to(tl.int64)
    tl.atomic_add(ptr, total, mask=cmask & (total != 0), sem="relaxed")


@triton.jit
def _flush_counts(hist_ptr, c, cmask, bins, has_sat, acc):
    """Reduce the packed counter over the observation axis and add it into ``hist`` (int64[C, bins])."""
    row = hist_ptr + c * bins
    _add_column(row + 0, acc & 63, cmask)
    _add_column(row + 1, (acc >> 6) & 63, cmask)
    _add_column(row + 2, (acc >> 12) & 63, cmask)
    _add_column(row + 3, (acc >> 18) & 63, cmask & (has_sat != 0))
    _add_column(row + 4, (acc >> 24) & 63, cmask & (bins > 4))


@triton.jit
def _tile_coords(pid, n_cblocks, tiles_per_prog, BLOCK_C: tl.constexpr):
    """(channel indices int64[BLOCK_C], first tile index) of program ``pid``."""
    pid = pid.to(tl.int64)
    pid_t = pid // n_cblocks
    pid_c = pid - pid_t * n_cblocks
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    return c, pid_t * tiles_per_prog


@triton.jit
def _axis_offsets(idx, stride, IS_UNIT: tl.constexpr):
    if IS_UNIT:
        return idx
    else:
        return idx * stride


# ----- kernel ----------------------------------------------------------------------------------------
@triton.jit
def sign_histogram_kernel(x_ptr, hist_ptr, C, N, sx_o, sx_c, sx_n, n_cblocks, n_nblocks, n_tiles, tiles_per_prog,
                          upper_bits, has_sat, bins,
                          BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, UNIT: tl.constexpr):
    c, t_first = _tile_coords(tl.program_id(0), n_cblocks, tiles_per_prog, BLOCK_C)
    cmask = c < C
    c_off = _axis_offsets(c, sx_c, UNIT == 1)
    upper = _scalar_from_bits(upper_bits, _upcast(tl.full((), 0, x_ptr.dtype.element_ty)))
    acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.int32)
    for i in range(0, tiles_per_prog):  # the last program's run may pass n_tiles: those tiles are masked off
        t = t_first + i
        o = t // n_nblocks
        n = (t - o * n_nblocks) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = cmask[:, None] & ((n < N) & (t < n_tiles))[None, :]
        offs = o * sx_o + c_off[:, None] + _axis_offsets(n, sx_n, UNIT == 2)[None, :]
        x = _upcast(tl.load(x_ptr + offs, mask=mask, other=0.0))
        acc = _count_tile(x, mask, upper, acc)
    _flush_counts(hist_ptr, c, cmask, bins, has_sat, acc)


# ----- launch planning (shared) ----------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    outer: int
    C: int
    N: int
    x_strides: tuple[int, int, int]
    y_strides: tuple[int, int, int] | None
    unit: int
    block_c: int
    block_n: int
    num_warps: int
    n_cblocks: int
    n_nblocks: int
    n_tiles: int
    tiles_per_prog: int
    grid: tuple[int]


def _double_bits(value: float) -> int:
    """The int64 bit pattern of a double (how Python floats reach the kernels exactly, fp64 included)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """How many programs fill the GPU (several resident per SM)."""
    return PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _canonical(shape, strides_list):
    """Fold ``[outer, C, inner]`` (shared by every tensor in ``strides_list``) into ``[outer', C, N]``."""
    outer, C, inner = shape
    strides_list = [list(s) for s in strides_list]
    if inner == 1:  # the observations are the outer index alone
        outer, inner = 1, outer
        for s in strides_list:
            s[0], s[2] = 0, s[0]
    elif outer > 1 and all(s[0] == inner * s[2] for s in strides_list):  # (outer, inner) is one strided axis
        outer, inner = 1, outer * inner
        for s in strides_list:
            s[0] = 0
    if outer == 1:
        for s in strides_list:
            s[0] = 0
    if C == 1:
        for s in strides_list:
            s[1] = 0
    if inner == 1:
        for s in strides_list:
            s[2] = 0
    return (outer, C, inner), [tuple(s) for s in strides_list]


def _choose_tile(C: int, N: int, unit: int, itemsize: int) -> tuple[int, int]:
    best, best_score = None, None
    for bc, bn in GPU_TILES_BY_UNIT[unit]:
        waste = (triton.cdiv(C, bc) * bc / C) * (triton.cdiv(N, bn) * bn / N)
        run = {UNIT_C: bc, UNIT_N: bn}.get(unit, 0) * itemsize  # contiguous bytes per tile row
        score = waste * (1.25 if run and run < 64 else 1.0)
        if best_score is None or score < best_score - 1e-9:
            best, best_score = (bc, bn), score
    return best


def plan(x3: torch.Tensor, y3: torch.Tensor | None = None) -> Plan | None:
    """How to launch the tiled kernel over ``x3`` (and ``y3``); None when there is nothing to count."""
    if x3.numel() == 0:
        return None
    strides = [x3.stride()] + ([y3.stride()] if y3 is not None else [])
    (outer, C, N), strides = _canonical(tuple(x3.shape), strides)
    unit = UNIT_NONE  # the axis of stride 1 (in x and y alike) becomes a constexpr: vector loads along it
    if N > 1 and all(s[2] == 1 for s in strides):
        unit = UNIT_N
    elif C > 1 and all(s[1] == 1 for s in strides):
        unit = UNIT_C
    if _interpreting(x3):
        block_c = min(triton.next_power_of_2(C), 256)
        block_n = min(triton.next_power_of_2(N), max(1, INTERPRETER_MAX_TILE // block_c))
        num_warps = 4
    else:
        block_c, block_n = _choose_tile(C, N, unit, x3.element_size())
        num_warps = GPU_NUM_WARPS
    n_cblocks = triton.cdiv(C, block_c)
    n_nblocks = triton.cdiv(N, block_n)
    n_tiles = outer * n_nblocks
    if _interpreting(x3):
        chunks = triton.cdiv(n_tiles, FIELD_MAX)
    else:
        target = _target_programs(x3.device)
        chunks = max(triton.cdiv(n_tiles, FIELD_MAX), min(n_tiles, triton.cdiv(target, n_cblocks)))
    tiles_per_prog = triton.cdiv(n_tiles, chunks)
    chunks = triton.cdiv(n_tiles, tiles_per_prog)
    assert tiles_per_prog <= FIELD_MAX
    return Plan(outer, C, N, strides[0], strides[1] if y3 is not None else None, unit, block_c, block_n,
                num_warps, n_cblocks, n_nblocks, n_tiles, tiles_per_prog, (n_cblocks * chunks,))


def _upper_bits_for(upper: float | None, dtype: torch.dtype) -> tuple[int, int]:
    """(bits, has_sat): ``upper`` rounded to the input dtype first, as torch compares ``z >= upper``."""
    if upper is None:
        return 0, 0
    return _double_bits(torch.tensor(float(upper), dtype=torch.float64).to(dtype).item()), 1


def _check_hist(hist: torch.Tensor, x3: torch.Tensor) -> None:
    C = x3.shape[1]
    if hist.dtype != torch.int64 or hist.dim() != 2 or hist.shape[0] != C or hist.shape[1] not in (4, 5) \
            or not hist.is_contiguous() or hist.device != x3.device:
        raise ValueError(f"hist must be a contiguous int64 [C={C}, 4|5] tensor on {x3.device}, got {hist.dtype} "
                         f"{tuple(hist.shape)} on {hist.device}")


# ----- launcher --------------------------------------------------------------------------------------
def sign_histogram_(hist: torch.Tensor, x3: torch.Tensor, upper: float | None) -> None:
    """Backend function: add the sign counts of ``x3`` ([outer, C, inner], any strides) into ``hist``."""
    if x3.dtype not in KERNEL_DTYPES:
        raise TypeError(f"sign_histogram_: no Triton kernel for {x3.dtype}")
    _check_hist(hist, x3)
    p = plan(x3)
    if p is None:
        return
    bits, has_sat = _upper_bits_for(upper, x3.dtype)
    sign_histogram_kernel[p.grid](
        x3, hist, p.C, p.N, *p.x_strides, p.n_cblocks, p.n_nblocks, p.n_tiles, p.tiles_per_prog,
        bits, has_sat, hist.shape[1],
        BLOCK_C=p.block_c, BLOCK_N=p.block_n, UNIT=p.unit, num_warps=p.num_warps)


# ----- ahead-of-time compilation (scripts/aot_triton.py) ---------------------------------------------
TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def _tile_signature(dtype_name: str, with_y: bool) -> dict[str, str]:
    sig = {"x_ptr": f"*{dtype_name}"}
    if with_y:
        sig["y_ptr"] = f"*{dtype_name}"
    sig["hist_ptr"] = "*i64"
    for name in ("C", "N", "sx_o", "sx_c", "sx_n"):
        sig[name] = "i64"
    if with_y:
        for name in ("sy_o", "sy_c", "sy_n"):
            sig[name] = "i64"
    for name in ("n_cblocks", "n_nblocks", "n_tiles", "tiles_per_prog", "upper_bits", "has_sat", "bins"):
        sig[name] = "i64" if name in ("n_tiles", "upper_bits") else "i32"
    return sig


# Arguments the JIT sees divisible by 16 for an aligned tensor with sizes/strides that are multiples of 16
# (the fast, vectorised case; other shapes are the same code without the vector loads).
ALIGNED_TILE_ARGS = ("x_ptr", "y_ptr", "hist_ptr", "C", "N", "sx_o", "sx_c", "sx_n", "sy_o", "sy_c", "sy_n")
UNIT_NAMES = {UNIT_NONE: "none", UNIT_C: "c", UNIT_N: "n"}


def aot_specializations():
    """(name, kernel, signature, constexprs, options, aligned args) of every specialisation the GPU launcher
    can produce."""
    for dname in TL_DTYPES.values():
        for unit in UNITS:
            for bc, bn in GPU_TILES_BY_UNIT[unit]:
                sig = _tile_signature(dname, with_y=False)
                sig.update(BLOCK_C="constexpr", BLOCK_N="constexpr", UNIT="constexpr")
                yield (f"sign_histogram[{dname},unit={UNIT_NAMES[unit]},{bc}x{bn}]", sign_histogram_kernel, sig,
                       {"BLOCK_C": bc, "BLOCK_N": bn, "UNIT": unit}, {"num_warps": GPU_NUM_WARPS},
                       [a for a in ALIGNED_TILE_ARGS if a in sig])


__all__ = ["Plan", "aot_specializations", "plan", "sign_histogram_", "sign_histogram_kernel"]
