"""Support tier: parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``) as the
pruning code sees them.

FSDP2 makes each parameter a ``DTensor``: every rank holds a slice (its *local* tensor) of a
tensor whose shape is the full one. Masks follow the same sharding (a ``DTensor`` buffer beside
the parameter), so that zeroing, enforcing and counting are local operations plus, for counts,
one sum over the ranks. Selecting the weights to prune needs a whole layer: it is gathered one
layer at a time (:func:`full`), never the whole model, and the result is sliced back locally
(:func:`shard_like`, no communication) — so the masks are exactly those of one process.

A multi-dimensional mesh (HSDP: ``fully_shard(model, mesh=...)`` over ``("replicate", "shard")``,
placements ``(Replicate(), Shard(0))``) holds each slice on several ranks: a count over the slices
is summed over the Shard mesh dimensions only (:func:`sharded_sum`), and a sum over all processes
takes each slice from one replica only (:func:`counted_here`).

Checkpoints hold whole tensors (:func:`full_state_dict`, gathered onto rank 0 only), so that the
file of a sharded run is the file of a one-process run; a resume reads it on every rank and cuts
each rank's slice out of it locally (:func:`shard_like`).

Everything here passes plain tensors through unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["counted_here", "from_local_like", "full", "full_state_dict", "is_sharded", "local", "reshard",
           "shard_like", "sharded_sum"]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return None
    return DTensor


def is_sharded(t) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter or mask of an FSDP2 model)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def local(t: Tensor) -> Tensor:
    """This rank's slice of a DTensor (a view that writes through); ``t`` itself otherwise."""
    return t.to_local() if is_sharded(t) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor, gathered on every rank (a collective: every rank must call
    it, in the same order); ``t`` itself otherwise."""
    return t.full_tensor() if is_sharded(t) else t


def shard_like(whole: Tensor, like: Tensor) -> Tensor:
    """``whole`` (the same on every rank) sharded as ``like`` is: each rank keeps its own slice, no
    communication. ``whole`` itself when ``like`` is not sharded."""
    if not is_sharded(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(like.to_local().device), like.device_mesh, like.placements, src_data_rank=None)


def _shard_dims(like) -> list[int]:
    """The mesh dimensions ``like`` is split over (Shard placements; Replicate ones hold copies)."""
    return [i for i, p in enumerate(like.placements) if p.is_shard()]


def sharded_sum(value: int, like: Tensor) -> int:
    """``value`` (a count over this rank's slice of ``like``) summed over the ranks ``like`` is
    sharded on — over its Shard mesh dimensions only, never over replicas (HSDP); ``value`` itself
    when it is not sharded."""
    if not is_sharded(like):
        return value
    import torch.distributed as dist

    from .distributed import collective_device

    total = torch.tensor([value], dtype=torch.int64)
    for dim in _shard_dims(like):  # one sum per Shard dimension: the sum over their whole sub-mesh
        group = like.device_mesh.get_group(dim)
        total = total.to(collective_device(group))
        dist.all_reduce(total, group=group)
    return int(total.item())


def counted_here(like: Tensor) -> bool:
    """Whether this rank's slice of ``like`` is the one to count in a sum over *all* processes: True
    unless ``like`` is sharded on a mesh with Replicate dimensions (HSDP) and this rank is not on
    their first replica (each slice is then counted once). True for a plain tensor."""
    if not is_sharded(like):
        return True
    coordinate = like.device_mesh.get_coordinate()
    if coordinate is None:  # not in the mesh: holds nothing
        return False
    return all(c == 0 for i, c in enumerate(coordinate) if not like.placements[i].is_shard())


def from_local_like(part: Tensor, like: Tensor) -> Tensor:
    """``part`` (this rank's slice, of ``like``'s local shape) as a DTensor sharded as ``like`` is, no
    communication; ``part`` itself when ``like`` is not sharded."""
    if not is_sharded(like):
        return part
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(part, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def reshard(model) -> None:
    """Put every FSDP2 module of ``model`` back on its shards. After a forward the root module keeps
    its parameters gathered (FSDP2 does not reshard the root after forward), and an edit of a
    gathered parameter is lost at the next reshard: masks are set on the shards only."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_state_dict(model) -> dict:
    """``model.state_dict()`` with whole tensors: for a model holding DTensors (FSDP2 parameters,
    their masks), every one gathered, on the CPU, on rank 0 only — the other ranks get ``{}``. A
    collective then: every rank calls it, outside any rank-0-only block. A bit-packed mask of a
    sharded parameter (each rank's own slice packed) is written as the whole tensor's packed mask.
    ``model.state_dict()`` itself for any other model."""
    reshard(model)  # after a forward the root holds gathered plain parameters: the state is the shards
    state = model.state_dict()
    if not any(is_sharded(v) for v in state.values()):
        return state
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .masks import whole_packed_masks

    # cpu_offload: rank 0 alone keeps the whole tensors, one at a time off the device
    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # packed masks of sharded parameters hold each rank's own slice's bits (one row per slice):
    # gathered and packed whole one layer at a time, in place of those rows under the same key
    for key, bits in whole_packed_masks(model).items():
        key = _full_key(model, key)
        if key not in whole:  # never left as the rows of slices: a wrong mask for a one-process model
            raise RuntimeError(f"full_state_dict: the packed mask {key!r} is not a key of the full state dict")
        whole[key] = bits
    return whole


def _full_key(model, key: str) -> str:
    """``key`` of ``model.state_dict()`` as the full state dict names it (without the prefixes of
    wrappers such as torch.compile's, as torch.distributed.checkpoint strips them)."""
    try:
        from torch.distributed.checkpoint.state_dict import _get_fqns
        fqns = _get_fqns(model, key)
    except Exception:  # noqa: BLE001 - a private helper: without it the key is taken as it is
        return key
    return next(iter(fqns)) if len(fqns) == 1 else key
