"""Bit-packed pruning masks: one bit per weight instead of a ``bool`` byte.

A packed mask of a parameter with ``n`` elements is a contiguous 1-d ``uint8`` tensor of
``ceil(n / 8)`` bytes; bit ``i`` (least significant first) of byte ``j`` is element ``8 j + i`` of the
parameter in its row-major (contiguous) order, 1 = keep. That is ``numpy.packbits(...,
bitorder="little")``'s layout. The bits past ``n`` in the last byte are written as 0 and ignored
when read.

Why: a masked optimizer step moves 20 (SGD with momentum) to 28 (AdamW) bytes per fp32 element; a
bool mask adds one more byte (3.6–5 % over an unmasked step), a packed one an eighth of a byte. The
masked steps (:func:`nepenthe.ops.masked_sgd_`, :func:`nepenthe.ops.masked_adamw_`) take either
form per parameter: a ``bool`` tensor of the parameter's shape, or a packed ``uint8`` one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["as_bool_mask", "is_packed_mask", "pack_mask", "packed_mask_bytes", "unpack_mask"]

_BIT_WEIGHTS = tuple(1 << i for i in range(8))


def packed_mask_bytes(numel: int) -> int:
    """The length of the packed mask of a parameter with ``numel`` elements."""
    return (int(numel) + 7) // 8


def is_packed_mask(mask: Tensor, like: Tensor) -> bool:
    """True when ``mask`` is laid out as the packed mask of ``like`` (dtype, length and contiguity;
    the device is the caller's check)."""
    return (mask.dtype == torch.uint8 and mask.dim() == 1 and mask.numel() == packed_mask_bytes(like.numel())
            and mask.is_contiguous())


@torch.no_grad()
def pack_mask(mask: Tensor) -> Tensor:
    """The packed form of a ``bool`` mask (any shape and layout), on its device.

    Written with torch ops (one pass of byte-sized temporaries): packing runs when a mask changes,
    once per pruning round, not per optimizer step, so a dedicated kernel would not pay for itself.
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = f"{mask.dtype} tensor" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"pack_mask: expected a bool mask (True = keep), got a {got}")
    flat = mask.reshape(-1).view(torch.uint8)  # bool storage holds 0 / 1 bytes
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    # eight distinct powers of two sum to at most 255: the uint8 sum is exact
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


@torch.no_grad()
def unpack_mask(packed: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The ``bool`` mask of ``shape`` that ``packed`` holds (contiguous, on ``packed``'s device)."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if (not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1
            or packed.numel() != packed_mask_bytes(n)):
        got = f"{packed.dtype}{list(packed.shape)}" if isinstance(packed, Tensor) else type(packed).__name__
        raise ValueError(f"unpack_mask: a packed mask of {shape} must be uint8[{packed_mask_bytes(n)}], got {got}")
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    bits = torch.bitwise_and(packed.unsqueeze(1), weights) != 0
    return bits.reshape(-1)[:n].reshape(shape)


def as_bool_mask(mask: Tensor | None, like: Tensor) -> Tensor | None:
    """``mask`` as a ``bool`` tensor of ``like``'s shape: unpacked when it is packed, else as it is."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return unpack_mask(mask, like.shape) if is_packed_mask(mask, like) else mask
