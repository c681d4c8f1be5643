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

import torch
from torch import Tensor

# the layout lives in the support tier, whose mask storage keeps the model's packed buffers too
from ..packed import pack_mask, packed_mask_bytes, unpack_mask

__all__ = ["as_bool_mask", "is_packed_mask", "pack_mask", "packed_mask_bytes", "unpack_mask"]


def is_packed_mask(mask: Tensor, like: Tensor) -> bool:
    """True when ``mask`` is laid out as the packed mask of ``like`` (dtype, length and contiguity;
    the device is the caller's check)."""
    return (mask.dtype == torch.uint8 and mask.dim() == 1 and mask.numel() == packed_mask_bytes(like.numel())
            and mask.is_contiguous())


def as_bool_mask(mask: Tensor | None, like: Tensor) -> Tensor | None:
    """``mask`` as a ``bool`` tensor of ``like``'s shape: unpacked when it is packed, else as it is."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return unpack_mask(mask, like.shape) if is_packed_mask(mask, like) else mask
