"""Scenarios of tests/distributed/test_packed_fsdp.py (run by tests/distributed/worker.py): bit-packed
masks on FSDP2-sharded models, and pruning on an HSDP (2-D, replicate x shard) mesh. In the
one-process reference (world 0) every scenario runs on the plain model."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import nepenthe
from nepenthe.loop.pruner import Pruner
from nepenthe.masks import (
    get_masks,
    is_mask_key,
    masked_modules,
    masked_parameters,
    pack_masks_,
    remaining_weights,
    unpack_masks_,
)
from nepenthe.sharded import full, is_sharded, local, reshard
from tests.distributed.worker import _digits, _global_accuracy, _same_retrain, shard, world


def _model() -> nn.Module:
    """Odd widths: sharded over 2 ranks, dim 0 splits unevenly (13 rows: 7 + 6; 1 row: 1 + 0) and
    the slices' bits do not start on byte boundaries (6 x 13 = 78 elements)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 13), nn.ReLU(), nn.Linear(13, 13), nn.ReLU(),
                         nn.Linear(13, 1), nn.ReLU(), nn.Linear(1, 10))


def _fsdp_model() -> nn.Module:
    """The model sharded by FSDP2 over every rank (unsharded in the one-process reference)."""
    model = _model()
    if dist.is_initialized():
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    return model


def _hsdp_model() -> nn.Module:
    """The model sharded over a (replicate, shard) mesh of 2 x world/2 ranks (HSDP)."""
    model = _model()
    if dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2, world() // 2), mesh_dim_names=("replicate", "shard"))
        fully_shard(model, mesh=mesh)
    return model


def _whole(model: nn.Module) -> dict:
    """The masks (bool, gathered), the kept-weight counts and the other tensors (gathered) of ``model``."""
    reshard(model)
    return {"masks": {k: full(v).clone() for k, v in sorted(get_masks(model).items())},
            "remaining": {k: remaining_weights(m) for k, m in sorted(masked_modules(model).items())},
            "weights": {k: full(v).detach().clone() for k, v in sorted(model.state_dict().items())
                        if not is_mask_key(k)}}


def _storage(model: nn.Module) -> dict:
    """What this rank stores for its masks: bytes per local weight, the buffers' dtypes, any DTensor."""
    held = masked_parameters(model)  # packed: this rank's bits
    buffers = [b for k, b in model.named_buffers() if is_mask_key(k)]  # as held (packed: one row per slice)
    weights = sum(local(getattr(m, n)).numel() for m, n, _ in held)
    return {"bytes_per_weight": sum(local(b).numel() * local(b).element_size() for _, _, b in held) / weights,
            "held_bytes": sum(local(b).numel() * local(b).element_size() for b in buffers), "weights": weights,
            "dtypes": sorted({str(b.dtype) for _, _, b in held}), "dtensor": any(is_sharded(b) for _, _, b in held)}


def _records(result) -> list:
    return [(r.iteration, r.accuracy, r.sparsity, r.within_tolerance, r.failure, r.layer_entropy)
            for r in result.iterations]


def packed_fsdp_prune_step() -> dict:
    out = {}
    for method in ("nepenthe", "imp"):
        model = _fsdp_model()
        step = nepenthe.prune_step(model, shard(_digits()["train"]),
                                   config=nepenthe.PruneConfig(method=method, zeta=0.4, pack_masks=True))
        out[method] = {"pruned": step.pruned, **_whole(model), "storage": _storage(model)}
    return out


def packed_fsdp_prune_loop() -> dict:
    model = _fsdp_model()
    result = nepenthe.prune(model, shard(_digits()["train"]), retrain=_same_retrain, evaluate=_global_accuracy,
                            config=nepenthe.PruneConfig(max_iters=2, delta=None, zeta=0.4, pack_masks=True))
    return {"records": _records(result), "stop": result.stop_reason, **_whole(model), "storage": _storage(model)}


def _packed_fsdp_prune(folder: Path, max_iters: int) -> dict:
    model = _fsdp_model()
    result = nepenthe.prune(model, shard(_digits()["train"]), retrain=_same_retrain, evaluate=_global_accuracy,
                            config=nepenthe.PruneConfig(max_iters=max_iters, delta=None, zeta=0.4, pack_masks=True,
                                                        checkpoint_dir=str(folder)))
    return {"records": _records(result), "selected": result.selected, "stop": result.stop_reason,
            **_whole(model), "storage": _storage(model)}


def packed_fsdp_checkpoints_then_resume() -> dict:
    """Rank 0 writes the whole tensors' packed masks; every rank resumes its slices from them."""
    folder = Path(sys.argv[4]) / "packed_fsdp_checkpoints"
    first = _packed_fsdp_prune(folder, 2)
    again = _packed_fsdp_prune(folder, 3)  # resumes after iteration 2 on every rank
    return {"first": first["records"], "again": again["records"],
            **{k: again[k] for k in ("selected", "stop", "masks", "remaining", "weights", "storage")},
            "files": sorted(p.name for p in folder.iterdir())}


def packed_fsdp_snapshot_restore() -> dict:
    """Pruner snapshots of packed sharded masks restored; the masks unpacked and packed again in place."""
    model = _fsdp_model()
    pruner = Pruner(model, shard(_digits()["train"]), nepenthe.PruneConfig(zeta=0.4, pack_masks=True), {})
    pruner.prune_step(pruner.measure(), 1.0)
    snap, first = pruner.snapshot(), _whole(model)
    pruner.prune_step(pruner.measure(), 1.0)
    second = _whole(model)
    pruner.restore(snap)
    restored, storage = _whole(model), _storage(model)
    unpack_masks_(model)
    unpacked, bool_storage = _whole(model), _storage(model)
    pack_masks_(model)
    return {"first": first, "second": second, "restored": restored, "storage": storage, "unpacked": unpacked,
            "bool_storage": bool_storage, "packed_again": _whole(model)}


def fsdp_fused_optimizers() -> dict:
    """The fused masked optimizers on FSDP2 parameters (each rank steps its slices), bool and packed masks."""
    import torch.nn.functional as F

    from nepenthe.loop.masked_training import masked_optimizer, repair_masked_weights

    out = {}
    for name in ("sgd", "adamw"):
        for packed in (False, True):
            model = _fsdp_model()
            nepenthe.prune_step(model, shard(_digits()["train"]), config=nepenthe.PruneConfig(zeta=0.4,
                                                                                              pack_masks=packed))
            opt = masked_optimizer(model, name, lr=0.05)
            for x, y in _digits()["train"][:3]:  # every rank the same batches: equal gradients, exact means
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            out[f"{name}, packed={packed}"] = {"revived": repair_masked_weights(model), **_whole(model)}
    return out


def _distributed_checkpoint(build) -> dict:
    """torch.distributed.checkpoint of a packed sharded model as it is: every rank's own bits are saved
    (one row per slice), and a new model whose masks exist (packed, all kept) loads them in place (no
    load_state_dict). A whole tensor's packed bits load through load_state_dict, cut to each rank's
    slice; the per-slice bits given to a plain model are refused."""
    import torch.distributed.checkpoint as dcp

    from nepenthe.masks import full_mask, restore_masks, set_mask

    folder = Path(sys.argv[4]) / f"dcp_{build.__name__}"
    model = build()
    nepenthe.prune_step(model, shard(_digits()["train"]), config=nepenthe.PruneConfig(zeta=0.4, pack_masks=True))

    def all_kept(fresh):  # the same mask buffers as ``model``'s (all kept) to load into
        for name in masked_modules(model):
            layer = fresh.get_submodule(name)
            set_mask(layer, torch.ones(layer.weight.shape, dtype=torch.bool), packed=True)
        return fresh

    saved = _whole(model)
    dcp.save(model.state_dict(), checkpoint_id=folder)
    fresh = all_kept(build())
    dcp.load(fresh.state_dict(), checkpoint_id=folder)
    whole = {f"{name}.weight_mask_bits": full_mask(layer) for name, layer in masked_modules(model).items()}
    cut = all_kept(build())
    cut.load_state_dict(whole, strict=False)
    bits = {k: v for k, v in model.state_dict().items() if k.endswith("_mask_bits")}
    try:
        restore_masks(_model(), bits)
        refused = None
    except ValueError as e:
        refused = str(e)
    return {"saved": saved, "loaded": _whole(fresh), "storage": _storage(fresh), "cut": _whole(cut)["masks"],
            "refused": refused}


def packed_fsdp_distributed_checkpoint() -> dict:
    return _distributed_checkpoint(_fsdp_model)


def packed_hsdp_distributed_checkpoint() -> dict:
    return _distributed_checkpoint(_hsdp_model)


def hsdp_prune_step() -> dict:
    out = {}
    for method in ("nepenthe", "imp"):
        for packed in (False, True):
            model = _hsdp_model()
            step = nepenthe.prune_step(model, shard(_digits()["train"]),
                                       config=nepenthe.PruneConfig(method=method, zeta=0.4, pack_masks=packed))
            out[f"{method}, packed={packed}"] = {"pruned": step.pruned, **_whole(model)}
    return out


def _hsdp_prune(folder: Path, max_iters: int) -> dict:
    model = _hsdp_model()
    result = nepenthe.prune(model, shard(_digits()["train"]), retrain=_same_retrain, evaluate=_global_accuracy,
                            config=nepenthe.PruneConfig(max_iters=max_iters, delta=None, zeta=0.4, pack_masks=True,
                                                        checkpoint_dir=str(folder)))
    return {"records": _records(result), "stop": result.stop_reason, **_whole(model)}


def hsdp_prune_loop() -> dict:
    """The loop with packed masks and checkpoints on the HSDP mesh, then resumed for one more iteration."""
    folder = Path(sys.argv[4]) / "hsdp_checkpoints"
    first = _hsdp_prune(folder, 2)
    again = _hsdp_prune(folder, 3)
    return {"first": first["records"], **again, "files": sorted(p.name for p in folder.iterdir())}


FSDP = [packed_fsdp_prune_step, packed_fsdp_prune_loop, packed_fsdp_checkpoints_then_resume,
        packed_fsdp_snapshot_restore, fsdp_fused_optimizers, packed_fsdp_distributed_checkpoint]
HSDP = [hsdp_prune_step, hsdp_prune_loop, packed_hsdp_distributed_checkpoint]
SCENARIOS = [*FSDP, *HSDP]
