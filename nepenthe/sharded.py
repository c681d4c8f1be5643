"""Support tier: parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``) as the
pruning code sees them.

FSDP2 makes each parameter a ``DTensor``: every rank holds a slice (its *local* tensor) of a
tensor whose shape is the full one. Masks follow the same sharding (a ``DTensor`` buffer beside
the parameter), so that zeroing, enforcing and counting are local operations plus, for counts,
one sum over the ranks. Selecting the weights to prune needs a whole layer: it is gathered one
layer at a time (:func:`full`), never the whole model, and the result is sliced back locally
(:func:`shard_like`, no communication) — so the masks are exactly those of one process.

Checkpoints hold whole tensors (:func:`full_state_dict`, gathered onto rank 0 only), so that the
file of a sharded run is the file of a one-process run; a resume reads it on every rank and cuts
each rank's slice out of it locally (:func:`shard_like`).

Everything here passes plain tensors through unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["full", "full_state_dict", "is_sharded", "local", "reshard", "shard_like", "sharded_sum"]


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


def sharded_sum(value: int, like: Tensor) -> int:
    """``value`` (a count over this rank's slice of ``like``) summed over the ranks ``like`` is
    sharded on; ``value`` itself when it is not sharded."""
    if not is_sharded(like):
        return value
    import torch.distributed as dist

    from .distributed import collective_device

    group = like.device_mesh.get_group()
    t = torch.tensor([value], dtype=torch.int64, device=collective_device(group))
    dist.all_reduce(t, group=group)
    return int(t.item())


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
    collective then: every rank calls it, outside any rank-0-only block. ``model.state_dict()``
    itself for any other model."""
    reshard(model)  # after a forward the root holds gathered plain parameters: the state is the shards
    state = model.state_dict()
    if not any(is_sharded(v) for v in state.values()):
        return state
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # cpu_offload: rank 0 alone keeps the whole tensors, one at a time off the device
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
