"""What the loop keeps of the model between iterations (the last good iteration, for a back-off, and
the selected one, returned at the end): a state_dict, in which every masked parameter whose masked
entries are zeros is held as its kept values only.

A masked parameter (state_dict keys ``X`` and ``X_mask`` / ``X_mask_bits``) is zero wherever it is
masked, so at sparsity s its copy needs (1 - s) of the bytes: :class:`Snapshot` keeps ``X[mask]``
(plus, when some masked entries are -0.0, their positions packed: 1 bit a weight) and rebuilds ``X``
bit for bit on restore. A parameter holding anything else at a masked position (a NaN, a value
revived outside the optimizer) is kept whole, as is every parameter of an FSDP2 model. Masks are
kept as the model stores them (bit-packed ones packed).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..masks import MASK_SUFFIX, PACKED_SUFFIX, is_mask_key, pack_mask, unpack_mask
from ..sharded import is_sharded

__all__ = ["Snapshot", "compact_state", "expand_into", "state_bytes"]


@dataclass
class Snapshot:
    """``state``: a state_dict without the keys of ``kept``; ``kept[key]``: (the kept values of that
    masked parameter in row-major order, its -0.0 positions packed or None); ``replaced``: EASIER's
    replaced sites."""

    state: dict
    replaced: list[str]
    kept: dict[str, tuple[Tensor, Tensor | None]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes the snapshot holds (each storage once)."""
        return state_bytes(self.state, *(t for pair in self.kept.values() for t in pair if t is not None))


def state_bytes(state: dict, *more: Tensor) -> int:
    """Bytes of the distinct storages of the tensors of ``state`` (and ``more``)."""
    seen, total = set(), 0
    for t in [*state.values(), *more]:
        if isinstance(t, Tensor) and not is_sharded(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def _mask_of(state: dict, key: str) -> Tensor | None:
    """The bool mask of parameter ``key`` held by ``state`` (a packed one unpacked: this layer only)."""
    param = state[key]
    bits = state.get(key + PACKED_SUFFIX)
    if isinstance(bits, Tensor):
        return unpack_mask(bits.to(param.device), param.shape)
    mask = state.get(key + MASK_SUFFIX)
    return mask.to(device=param.device, dtype=torch.bool) if isinstance(mask, Tensor) else None


@torch.no_grad()
def _compact(param: Tensor, keep: Tensor) -> tuple[Tensor, Tensor | None] | None:
    """(kept values, packed -0.0 positions or None) when every masked entry of ``param`` is ±0.0;
    else None (kept whole)."""
    if keep.shape != param.shape or not param.is_floating_point():
        return None
    dropped = ~keep
    rest = param[dropped]
    if bool((rest != 0).any()):  # a NaN is != 0 too
        return None
    negative = pack_mask(torch.signbit(param).logical_and_(dropped)) if bool(torch.signbit(rest).any()) else None
    return param[keep], negative


def compact_state(state: dict, replaced: list[str], *, clone: bool = True) -> Snapshot:
    """A :class:`Snapshot` of ``state`` (a state_dict). ``clone``: copy what is kept (a live model's
    state_dict aliases its parameters); without it ``state``'s own tensors are kept (a state read
    from a file, used by nothing else). A state holding FSDP2 shards is kept whole."""
    state = copy.copy(state)  # an OrderedDict keeps its _metadata (load_state_dict's versions)
    kept = {}
    if not any(is_sharded(v) for v in state.values()):
        suffix = {True: len(PACKED_SUFFIX), False: len(MASK_SUFFIX)}
        for key in [k[: -suffix[k.endswith(PACKED_SUFFIX)]] for k in state if is_mask_key(k)]:
            param = state.get(key)
            keep = _mask_of(state, key) if isinstance(param, Tensor) else None
            if keep is not None and (pair := _compact(param.detach(), keep)) is not None:
                kept[key] = pair
                del state[key]
            del keep
    if clone:
        state = copy.deepcopy(state)
    return Snapshot(state, list(replaced), kept)


@torch.no_grad()
def expand_into(snap: Snapshot, state: dict) -> dict:
    """Write each compacted parameter of ``snap`` into its tensor of ``state`` (the model's
    state_dict, whose tensors are its parameters, masks already restored), and return ``snap.state``
    completed with those tensors: what ``load_state_dict`` takes (copying a parameter onto itself)."""
    full = copy.copy(snap.state)
    for key, (values, negative) in snap.kept.items():
        param, keep = state[key], _mask_of(state, key)
        param.zero_().masked_scatter_(keep, values.to(param.device))
        del keep
        if negative is not None:
            param.masked_fill_(unpack_mask(negative.to(param.device), param.shape), -0.0)
        full[key] = param
    return full
