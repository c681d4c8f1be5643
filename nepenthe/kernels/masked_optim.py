"""Triton multi-tensor masked SGD / AdamW steps (torch.optim arithmetic, then masked entries set to +0).

Launch. Parameters are grouped by dtype; each group is ONE launch over all its tensors. The launcher
builds one int64 metadata tensor on the device (cached by tensor addresses and sizes, so a training
loop builds it once): per tensor the data pointers of param / grad / states / mask, its numel and
its mask's kind (none; a bool byte per element; packed bits, bit ``i % 8`` of byte ``i // 8``, read as
bits, never unpacked); per program the (tensor index, chunk index) of the ``CHUNK`` elements it
updates. A program loads its pointers from those tables (int64 addresses bitcast to typed pointers)
and walks its chunk in ``BLOCK``-element steps: load, update in fp32 (fp64 for fp64) with torch's
operations one by one, set masked entries to exactly +0.0, store. A whole chunk runs with a constant
mask, so when every address of the group is 16-byte aligned (``ALIGNED``, checked by the launcher)
the loads and stores are 16-byte vectors; a tensor's last, partial chunk runs masked. Empty tensors
get no program; nothing to do launches nothing. Hyperparameters travel as the int64 bit patterns of
doubles, so fp64 steps see them exactly.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from .sign_histogram import KERNEL_DTYPES, TL_DTYPES, _div_rn, _double_bits, _scalar_from_bits, _sqrt_rn, _upcast

GPU_BLOCK = 1024
GPU_CHUNK = 4 * GPU_BLOCK  # elements per program
GPU_NUM_WARPS = 4
INTERPRETER_MAX_BLOCK = 4096
_META_CACHE: OrderedDict = OrderedDict()
_META_CACHE_SIZE = 32


# ----- device helpers ----------------------------------------------------------------------------------
@triton.jit
def _table_ptr(meta_ptr, row, n_tensors, t, ELEM: tl.constexpr, ALIGNED: tl.constexpr, ALIGN: tl.constexpr = 16):
    ptr = tl.load(meta_ptr + row * n_tensors + t).to(tl.pointer_type(ELEM), bitcast=True)
    if ALIGNED:  # the launcher checked every address of the group: vector loads are safe
        ptr = tl.multiple_of(ptr, ALIGN)
    return ptr


@triton.jit
def _keep(k_ptr, offs, inb, mask_kind):
    """Whether each element is kept. ``mask_kind``: 0 no mask, 1 one bool byte per element, 2 packed bits
    (bit ``offs % 8`` of byte ``offs // 8``, least significant first); ``k_ptr`` is at the chunk's first
    mask byte either way (a chunk starts on a multiple of 8 elements)."""
    if mask_kind == 2:
        byte = tl.load(k_ptr + (offs >> 3), mask=inb, other=255).to(tl.int32)
        keep = ((byte >> (offs & 7)) & 1) != 0
    else:
        keep = tl.load(k_ptr + offs, mask=inb & (mask_kind != 0), other=1) != 0
    return keep


@triton.jit
def _mask_ptr(meta_ptr, row, n_tensors, t, start, mask_kind, MASK_ALIGN: tl.constexpr, ALIGNED: tl.constexpr):
    """The first mask byte of the chunk starting at element ``start``: a byte per element, or per 8 packed."""
    ptr = _table_ptr(meta_ptr, row, n_tensors, t, tl.uint8, ALIGNED, MASK_ALIGN)
    return ptr + tl.where(mask_kind == 2, start >> 3, start)


@triton.jit
def _program_chunk(meta_ptr, n_tensors, n_rows: tl.constexpr, n_programs, CHUNK: tl.constexpr):
    """(tensor index, first element, elements left from there, mask kind: 0 none, 1 bool, 2 packed) of
    this program's chunk."""
    pid = tl.program_id(0)
    t = tl.load(meta_ptr + n_rows * n_tensors + pid)
    start = tl.load(meta_ptr + n_rows * n_tensors + n_programs + pid) * CHUNK
    numel = tl.load(meta_ptr + (n_rows - 2) * n_tensors + t)
    has_mask = tl.load(meta_ptr + (n_rows - 1) * n_tensors + t)
    return t, start, numel - start, has_mask


# ----- SGD ---------------------------------------------------------------------------------------------
# metadata rows: params, grads, momentum buffers, masks, numels, mask kinds | program tensor | program chunk


@triton.jit
def _sgd_block(p_ptr, g_ptr, b_ptr, k_ptr, offs, inb, has_mask, lr, momentum, one_minus_dampening, weight_decay,
               nesterov, maximize, first_step, HAS_MOMENTUM: tl.constexpr):
    ELEM = p_ptr.dtype.element_ty
    p = _upcast(tl.load(p_ptr + offs, mask=inb, other=0.0))
    g = _upcast(tl.load(g_ptr + offs, mask=inb, other=0.0))
    g = tl.where(maximize != 0, -g, g)
    # torch's ops one by one (``a.add(b, alpha=s)`` is one fused multiply-add in ATen's kernels)
    g = tl.where(weight_decay != 0, tl.fma(weight_decay, p, g), g)
    if HAS_MOMENTUM:
        b = _upcast(tl.load(b_ptr + offs, mask=inb & (first_step == 0), other=0.0))
        b = tl.where(first_step != 0, g, tl.fma(one_minus_dampening, g, b * momentum))
        g = tl.where(nesterov != 0, tl.fma(momentum, b, g), b)
    p = tl.fma(-lr, g, p)
    keep = _keep(k_ptr, offs, inb, has_mask)
    tl.store(p_ptr + offs, tl.where(keep, p, 0.0).to(ELEM), mask=inb)
    if HAS_MOMENTUM:
        tl.store(b_ptr + offs, tl.where(keep, b, 0.0).to(ELEM), mask=inb)


@triton.jit
def masked_sgd_kernel(dtype_ptr, meta_ptr, n_tensors, n_programs,
                      lr_bits, momentum_bits, one_minus_dampening_bits, weight_decay_bits,
                      nesterov, maximize, first_step,
                      BLOCK: tl.constexpr, CHUNK: tl.constexpr, HAS_MOMENTUM: tl.constexpr, ALIGNED: tl.constexpr):
    ELEM: tl.constexpr = dtype_ptr.dtype.element_ty
    # bool-mask bytes per 16-byte vector of values: the mask loads in the values' own layout (a wider
    # mask vector would cost a shared-memory layout conversion per block)
    MASK_ALIGN: tl.constexpr = 128 // ELEM.primitive_bitwidth
    t, start, left, has_mask = _program_chunk(meta_ptr, n_tensors, 6, n_programs, CHUNK)
    p_ptr = _table_ptr(meta_ptr, 0, n_tensors, t, ELEM, ALIGNED) + start
    g_ptr = _table_ptr(meta_ptr, 1, n_tensors, t, ELEM, ALIGNED) + start
    b_ptr = _table_ptr(meta_ptr, 2, n_tensors, t, ELEM, ALIGNED) + start
    k_ptr = _mask_ptr(meta_ptr, 3, n_tensors, t, start, has_mask, MASK_ALIGN, ALIGNED)
    like = _upcast(tl.full((), 0, ELEM))
    lr = _scalar_from_bits(lr_bits, like)
    momentum = _scalar_from_bits(momentum_bits, like)
    one_minus_dampening = _scalar_from_bits(one_minus_dampening_bits, like)
    weight_decay = _scalar_from_bits(weight_decay_bits, like)
    lanes = tl.arange(0, BLOCK)
    if left >= CHUNK:  # a whole chunk: a constant mask keeps the loads vectorised
        for i in range(0, CHUNK // BLOCK):
            _sgd_block(p_ptr, g_ptr, b_ptr, k_ptr, i * BLOCK + lanes, tl.full([BLOCK], 1, tl.int1), has_mask, lr,
                       momentum, one_minus_dampening, weight_decay, nesterov, maximize, first_step, HAS_MOMENTUM)
    else:  # the tail of a tensor
        tail = left.to(tl.int32)
        for i in range(0, tl.cdiv(tail, BLOCK)):
            offs = i * BLOCK + lanes
            _sgd_block(p_ptr, g_ptr, b_ptr, k_ptr, offs, offs < tail, has_mask, lr, momentum, one_minus_dampening,
                       weight_decay, nesterov, maximize, first_step, HAS_MOMENTUM)


# ----- AdamW -------------------------------------------------------------------------------------------
# metadata rows: params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, masks, numels, mask kinds | program
# tensor | program chunk


@triton.jit
def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, k_ptr, offs, inb, has_mask, decay, w, beta2, one_minus_beta2,
                 eps, step_size, bc2_sqrt, maximize, AMSGRAD: tl.constexpr):
    ELEM = p_ptr.dtype.element_ty
    p = _upcast(tl.load(p_ptr + offs, mask=inb, other=0.0))
    g = _upcast(tl.load(g_ptr + offs, mask=inb, other=0.0))
    m = _upcast(tl.load(m_ptr + offs, mask=inb, other=0.0))
    v = _upcast(tl.load(v_ptr + offs, mask=inb, other=0.0))
    g = tl.where(maximize != 0, -g, g)
    p = p * decay
    # torch.lerp(m, g, w): m + w (g - m) for |w| < 0.5, else g - (g - m)(1 - w)
    diff = g - m
    m = tl.where(tl.abs(w) < 0.5, tl.fma(w, diff, m), tl.fma(-diff, 1.0 - w, g))
    v = tl.fma(one_minus_beta2 * g, g, v * beta2)  # v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if AMSGRAD:
        vmax = _upcast(tl.load(vmax_ptr + offs, mask=inb, other=0.0))
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        denom = _div_rn(_sqrt_rn(vmax), bc2_sqrt) + eps
    else:
        denom = _div_rn(_sqrt_rn(v), bc2_sqrt) + eps
    p = tl.fma(-step_size, _div_rn(m, denom), p)  # p.addcdiv_(m, denom, value=-step_size)
    keep = _keep(k_ptr, offs, inb, has_mask)
    tl.store(p_ptr + offs, tl.where(keep, p, 0.0).to(ELEM), mask=inb)
    tl.store(m_ptr + offs, tl.where(keep, m, 0.0).to(ELEM), mask=inb)
    tl.store(v_ptr + offs, tl.where(keep, v, 0.0).to(ELEM), mask=inb)
    if AMSGRAD:
        tl.store(vmax_ptr + offs, tl.where(keep, vmax, 0.0).to(ELEM), mask=inb)


@triton.jit
def masked_adamw_kernel(dtype_ptr, meta_ptr, n_tensors, n_programs,
                        decay_bits, lerp_weight_bits, beta2_bits, one_minus_beta2_bits, eps_bits,
                        step_size_bits, bias_correction2_sqrt_bits, maximize,
                        BLOCK: tl.constexpr, CHUNK: tl.constexpr, AMSGRAD: tl.constexpr, ALIGNED: tl.constexpr):
    ELEM: tl.constexpr = dtype_ptr.dtype.element_ty
    # bool-mask bytes per 16-byte vector of values: the mask loads in the values' own layout (a wider
    # mask vector would cost a shared-memory layout conversion per block)
    MASK_ALIGN: tl.constexpr = 128 // ELEM.primitive_bitwidth
    t, start, left, has_mask = _program_chunk(meta_ptr, n_tensors, 8, n_programs, CHUNK)
    p_ptr = _table_ptr(meta_ptr, 0, n_tensors, t, ELEM, ALIGNED) + start
    g_ptr = _table_ptr(meta_ptr, 1, n_tensors, t, ELEM, ALIGNED) + start
    m_ptr = _table_ptr(meta_ptr, 2, n_tensors, t, ELEM, ALIGNED) + start
    v_ptr = _table_ptr(meta_ptr, 3, n_tensors, t, ELEM, ALIGNED) + start
    vmax_ptr = _table_ptr(meta_ptr, 4, n_tensors, t, ELEM, ALIGNED) + start
    k_ptr = _mask_ptr(meta_ptr, 5, n_tensors, t, start, has_mask, MASK_ALIGN, ALIGNED)
    like = _upcast(tl.full((), 0, ELEM))
    decay = _scalar_from_bits(decay_bits, like)  # 1 - lr * weight_decay
    w = _scalar_from_bits(lerp_weight_bits, like)  # 1 - beta1
    beta2 = _scalar_from_bits(beta2_bits, like)
    one_minus_beta2 = _scalar_from_bits(one_minus_beta2_bits, like)
    eps = _scalar_from_bits(eps_bits, like)
    step_size = _scalar_from_bits(step_size_bits, like)  # lr / (1 - beta1^step)
    bc2_sqrt = _scalar_from_bits(bias_correction2_sqrt_bits, like)  # sqrt(1 - beta2^step)
    lanes = tl.arange(0, BLOCK)
    if left >= CHUNK:  # a whole chunk: a constant mask keeps the loads vectorised
        for i in range(0, CHUNK // BLOCK):
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, k_ptr, i * BLOCK + lanes, tl.full([BLOCK], 1, tl.int1),
                         has_mask, decay, w, beta2, one_minus_beta2, eps, step_size, bc2_sqrt, maximize, AMSGRAD)
    else:  # the tail of a tensor
        tail = left.to(tl.int32)
        for i in range(0, tl.cdiv(tail, BLOCK)):
            offs = i * BLOCK + lanes
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, k_ptr, offs, offs < tail, has_mask, decay, w, beta2,
                         one_minus_beta2, eps, step_size, bc2_sqrt, maximize, AMSGRAD)


# ----- launch planning -----------------------------------------------------------------------------------
def _check(name: str, tensors, like: torch.Tensor, mask: bool = False) -> None:
    for t in tensors:
        if t is None:
            continue
        if mask and t.dtype == torch.uint8:  # packed: uint8[ceil(numel / 8)], read as bits
            want = (like.numel() + 7) // 8
            if t.shape != (want,) or t.device != like.device or not t.is_contiguous():
                raise ValueError(f"{name}: a packed mask of a parameter of {like.numel()} elements must be a "
                                 f"contiguous uint8[{want}] on {like.device}, got {tuple(t.shape)} on {t.device}")
            continue
        if t.shape != like.shape or t.device != like.device or not t.is_contiguous() \
                or t.dtype != (torch.bool if mask else like.dtype):
            raise ValueError(f"{name}: expected a contiguous {torch.bool if mask else like.dtype} tensor shaped "
                             f"{tuple(like.shape)} on {like.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")


def _groups(params: list[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of the non-empty parameters, grouped by (dtype, device)."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if p.dtype not in KERNEL_DTYPES:
            raise TypeError(f"no Triton optimizer kernel for {p.dtype}")
        if p.numel():
            groups.setdefault((p.dtype, p.device), []).append(i)
    return groups


def _block_and_chunk(numels: list[int], device: torch.device) -> tuple[int, int, int]:
    """(BLOCK, CHUNK, num_warps): fixed on the GPU. Under the interpreter one or two programs per tensor,
    BLOCK == CHUNK ≤ the largest numel, so both the whole-chunk and the tail path run."""
    if device.type == "cuda":
        return GPU_BLOCK, GPU_CHUNK, GPU_NUM_WARPS
    block = max(16, min(INTERPRETER_MAX_BLOCK, 1 << (max(numels).bit_length() - 1)))
    return block, block, 4


def _metadata(kind: str, rows: list[list[torch.Tensor | None]], fallback: list[torch.Tensor], chunk: int,
              device: torch.device) -> tuple[torch.Tensor, int, bool]:
    """(int64 [rows of pointers | numels | mask kinds | program tensor | program chunk] on ``device``,
    number of programs, whether every address is 16-byte aligned). Cached: a training loop builds it once."""
    ptrs = tuple(tuple((t if t is not None else f).data_ptr() for t, f in zip(row, fallback)) for row in rows)
    numels = tuple(f.numel() for f in fallback)
    has_mask = tuple(0 if t is None else 2 if t.dtype == torch.uint8 else 1 for t in rows[-1])  # mask kinds
    key = (kind, str(device), chunk, ptrs, numels, has_mask)
    hit = _META_CACHE.get(key)
    if hit is not None:
        _META_CACHE.move_to_end(key)
        return hit
    counts = torch.tensor([triton.cdiv(n, chunk) for n in numels], dtype=torch.int64)
    n_programs = int(counts.sum())
    tensor_of = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    chunk_of = torch.arange(n_programs, dtype=torch.int64) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts,
                                                                                    counts)
    table = torch.tensor([x for row in ptrs for x in row] + list(numels) + list(has_mask), dtype=torch.int64)
    meta = torch.cat([table, tensor_of, chunk_of]).to(device)
    aligned = all(x % 16 == 0 for row in ptrs for x in row)
    _META_CACHE[key] = hit = (meta, n_programs, aligned)
    if len(_META_CACHE) > _META_CACHE_SIZE:
        _META_CACHE.popitem(last=False)
    return hit


def clear_cache() -> None:
    _META_CACHE.clear()


def _bits(*values: float) -> list[int]:
    return [_double_bits(v) for v in values]


# ----- launchers -----------------------------------------------------------------------------------------
@torch.no_grad()
def masked_sgd_(params, grads, momentum_buffers, masks, lr, momentum, dampening, weight_decay, nesterov,
                maximize, first_step) -> None:
    """Backend function: one torch.optim.SGD step over all parameters, then masked entries set to +0."""
    has_momentum = momentum != 0
    n = len(params)
    if len(grads) != n or len(masks) != n or (has_momentum and len(momentum_buffers) != n):
        raise ValueError("masked_sgd_: params, grads, masks (and momentum_buffers when momentum != 0) must have "
                         "the same length")
    for (_, device), idx in _groups(params).items():
        ps = [params[i] for i in idx]
        gs, ms = [grads[i] for i in idx], [masks[i] for i in idx]
        bs = [momentum_buffers[i] for i in idx] if has_momentum else [None] * len(idx)
        for p, g, b, m in zip(ps, gs, bs, ms):
            _check("masked_sgd_", [p, g, b], p)
            _check("masked_sgd_ mask", [m], p, mask=True)
        block, chunk, warps = _block_and_chunk([p.numel() for p in ps], device)
        meta, n_programs, aligned = _metadata("sgd", [ps, gs, bs, ms], ps, chunk, device)
        masked_sgd_kernel[(n_programs,)](
            ps[0], meta, len(ps), n_programs, *_bits(lr, momentum, 1 - dampening, weight_decay),
            int(bool(nesterov)), int(bool(maximize)), int(bool(first_step)),
            BLOCK=block, CHUNK=chunk, HAS_MOMENTUM=bool(has_momentum), ALIGNED=aligned, num_warps=warps)


@torch.no_grad()
def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks, lr, beta1, beta2, eps,
                  weight_decay, step, amsgrad, maximize) -> None:
    """Backend function: one torch.optim.AdamW step (step count ``step`` ≥ 1), then masked entries set to +0."""
    n = len(params)
    if any(len(x) != n for x in (grads, exp_avgs, exp_avg_sqs, masks)) or (amsgrad and len(max_exp_avg_sqs) != n):
        raise ValueError("masked_adamw_: params, grads, exp_avgs, exp_avg_sqs, masks (and max_exp_avg_sqs with "
                         "amsgrad) must have the same length")
    if step < 1:
        raise ValueError(f"masked_adamw_: step must be >= 1 (already incremented), got {step}")
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    step_size = lr / bias_correction1
    for (_, device), idx in _groups(params).items():
        ps = [params[i] for i in idx]
        gs, es, vs, ks = ([x[i] for i in idx] for x in (grads, exp_avgs, exp_avg_sqs, masks))
        xs = [max_exp_avg_sqs[i] for i in idx] if amsgrad else [None] * len(idx)
        for p, g, e, v, x, k in zip(ps, gs, es, vs, xs, ks):
            _check("masked_adamw_", [p, g, e, v, x], p)
            _check("masked_adamw_ mask", [k], p, mask=True)
        block, chunk, warps = _block_and_chunk([p.numel() for p in ps], device)
        meta, n_programs, aligned = _metadata("adamw", [ps, gs, es, vs, xs, ks], ps, chunk, device)
        masked_adamw_kernel[(n_programs,)](
            ps[0], meta, len(ps), n_programs,
            *_bits(1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, eps, step_size, bias_correction2_sqrt),
            int(bool(maximize)),
            BLOCK=block, CHUNK=chunk, AMSGRAD=bool(amsgrad), ALIGNED=aligned, num_warps=warps)


# ----- ahead-of-time compilation (scripts/aot_triton.py) ---------------------------------------------------
def aot_specializations():
    """(name, kernel, signature, constexprs, options, aligned args) of every specialisation the GPU launchers
    can produce."""
    common = {"dtype_ptr": None, "meta_ptr": "*i64", "n_tensors": "i32", "n_programs": "i32"}
    sgd_scalars = ("lr_bits", "momentum_bits", "one_minus_dampening_bits", "weight_decay_bits")
    adamw_scalars = ("decay_bits", "lerp_weight_bits", "beta2_bits", "one_minus_beta2_bits", "eps_bits",
                     "step_size_bits", "bias_correction2_sqrt_bits")
    for dname in TL_DTYPES.values():
        for aligned in (True, False):
            for has_momentum in (False, True):
                sig = dict(common, dtype_ptr=f"*{dname}", **{k: "i64" for k in sgd_scalars})
                sig.update(nesterov="i32", maximize="i32", first_step="i32", BLOCK="constexpr", CHUNK="constexpr",
                           HAS_MOMENTUM="constexpr", ALIGNED="constexpr")
                yield (f"masked_sgd[{dname},momentum={has_momentum},aligned={aligned}]", masked_sgd_kernel, sig,
                       {"BLOCK": GPU_BLOCK, "CHUNK": GPU_CHUNK, "HAS_MOMENTUM": has_momentum, "ALIGNED": aligned},
                       {"num_warps": GPU_NUM_WARPS}, ["dtype_ptr", "meta_ptr"])
            for amsgrad in (False, True):
                sig = dict(common, dtype_ptr=f"*{dname}", **{k: "i64" for k in adamw_scalars})
                sig.update(maximize="i32", BLOCK="constexpr", CHUNK="constexpr", AMSGRAD="constexpr",
                           ALIGNED="constexpr")
                yield (f"masked_adamw[{dname},amsgrad={amsgrad},aligned={aligned}]", masked_adamw_kernel, sig,
                       {"BLOCK": GPU_BLOCK, "CHUNK": GPU_CHUNK, "AMSGRAD": amsgrad, "ALIGNED": aligned},
                       {"num_warps": GPU_NUM_WARPS}, ["dtype_ptr", "meta_ptr"])


__all__ = ["aot_specializations", "clear_cache", "masked_adamw_", "masked_adamw_kernel", "masked_sgd_",
           "masked_sgd_kernel"]
