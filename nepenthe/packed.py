"""The bit layout of packed masks (1 bit per weight), and the form a rank stores the bits of its slice
of an FSDP2-sharded parameter in.

A packed mask of ``n`` elements is a contiguous ``uint8[ceil(n / 8)]``: bit ``i % 8`` (least
significant first) of byte ``i // 8`` is element ``i`` in row-major order, 1 = keep
(``numpy.packbits(..., bitorder="little")``); the bits past ``n`` in the last byte are 0.

**Per-slice form** (FSDP2, any mesh): each rank packs the bits of its own slice (``to_local()``), and
the buffer holding them is a ``DTensor`` with one row per slice: shape ``[s_1, ..., s_k, L]`` for
the ``k`` mesh dimensions the parameter is sharded over (sizes ``s_i``), placed ``Shard(0) ..
Shard(k-1)`` on them (``Replicate()`` on the others, as the parameter), each rank's local part
``[1, ..., 1, L]``. ``L`` is the packed length of the largest slice (every row the same length: the
even split ``torch.distributed.checkpoint`` re-shards); a smaller slice's row ends in zero bytes.
So a rank's bits are saved as its own (never one rank's bits taken for all, as a plain per-rank
buffer would be) and a load on another mesh is refused for its shape, not read wrongly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .sharded import is_sharded, local

__all__ = ["checked_slice_bits", "count_kept_bits", "pack_mask", "packed_mask_bytes", "per_slice_bits", "slice_bits",
           "unpack_mask"]

_BIT_WEIGHTS = tuple(1 << i for i in range(8))


# ----- the bit layout ------------------------------------------------------------------------------------
def packed_mask_bytes(numel: int) -> int:
    """The length of the packed mask of a parameter with ``numel`` elements."""
    return (int(numel) + 7) // 8


@torch.no_grad()
def pack_mask(mask: Tensor) -> Tensor:
    """The packed form of a ``bool`` mask (any shape and layout), on its device: ``uint8[ceil(n/8)]``,
    bits past ``n`` in the last byte 0.

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
    """The ``bool`` mask of ``shape`` that ``packed`` holds (contiguous, on ``packed``'s device); the
    bits past the last element are ignored."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if (not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1
            or packed.numel() != packed_mask_bytes(n)):
        got = f"{packed.dtype}{list(packed.shape)}" if isinstance(packed, Tensor) else type(packed).__name__
        raise ValueError(f"unpack_mask: a packed mask of {shape} must be uint8[{packed_mask_bytes(n)}], got {got}")
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    bits = torch.bitwise_and(packed.unsqueeze(1), weights) != 0
    return bits.reshape(-1)[:n].reshape(shape)


def count_kept_bits(bits: Tensor, numel: int) -> int:
    """Set bits among the first ``numel`` of a packed mask, without unpacking it (8 byte-sized passes)."""
    total = sum(int(torch.bitwise_and(bits, b).count_nonzero()) for b in _BIT_WEIGHTS)
    tail = numel % 8
    if tail and bits.numel():  # padding bits of the last byte: 0 when we wrote them, not counted when not
        total -= bin(int(bits[-1]) >> tail).count("1")
    return total


# ----- the per-slice form (FSDP2) ------------------------------------------------------------------------
def _per_slice_layout(like) -> tuple[list, tuple[int, ...]]:
    """(placements, global shape) of the per-slice form of the sharded parameter ``like``'s bits."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements, largest = like.device_mesh, [], list(like.shape)
    rows = []
    for i, p in enumerate(like.placements):
        if p.is_shard():  # torch.chunk's split: the first slice is the largest
            largest[p.dim] = -(-largest[p.dim] // mesh.size(i))
            placements.append(Shard(len(rows)))
            rows.append(mesh.size(i))
        else:
            placements.append(Replicate())
    return placements, (*rows, packed_mask_bytes(math.prod(largest)))


def per_slice_bits(bits: Tensor, like: Tensor) -> Tensor:
    """``bits`` (the packed mask of this rank's slice of the sharded ``like``) in the per-slice form
    (a DTensor, one row per slice; no communication); ``bits`` itself for a plain ``like``."""
    if not is_sharded(like):
        return bits
    from torch.distributed.tensor import DTensor

    placements, shape = _per_slice_layout(like)
    row = bits.new_zeros((1,) * (len(shape) - 1) + (shape[-1],))
    row.view(-1)[: bits.numel()] = bits
    return DTensor.from_local(row, like.device_mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def slice_bits(stored: Tensor, like: Tensor) -> Tensor:
    """This rank's bits out of ``stored`` (the per-slice form of ``like``'s packed mask, as this module
    wrote it): a view of its row, ``uint8[ceil(local numel / 8)]``."""
    return local(stored).view(-1)[: packed_mask_bytes(local(like).numel())]


def checked_slice_bits(stored, like: Tensor, where: str) -> Tensor:
    """:func:`slice_bits` of an untrusted ``stored`` (a state_dict's): anything but the per-slice form of
    ``like``'s mask (another mesh's rows, a whole tensor's bits, another dtype) is refused with
    ValueError naming ``where``."""
    placements, shape = _per_slice_layout(like)
    ok = (is_sharded(stored) and stored.dtype == torch.uint8 and tuple(stored.shape) == shape
          and list(stored.placements) == placements and stored.device_mesh == like.device_mesh
          and tuple(local(stored).shape) == (1,) * (len(shape) - 1) + (shape[-1],))
    if not ok:
        got = f"{type(stored).__name__} {getattr(stored, 'dtype', '')}{list(getattr(stored, 'shape', []))}"
        raise ValueError(f"{where}: the packed mask of a parameter sharded as {list(like.placements)} over "
                         f"{like.device_mesh.size()} ranks is held as a uint8 DTensor of shape {list(shape)} "
                         f"(one row of bits per slice), got {got}: it was saved on another mesh or by another "
                         "model; load a whole checkpoint (nepenthe.sharded.full_state_dict) instead")
    return slice_bits(stored, like)
