"""One rank of the multi-process tests (tests/distributed/test_distributed.py).

``python -m tests.distributed.worker RANK WORLD INIT_FILE OUT_DIR`` joins a gloo group of WORLD
processes (WORLD 0: no group, the one-process reference) and runs every scenario of ``SCENARIOS``
(of this module, or of the one ``NEPENTHE_SCENARIO_MODULE`` names) in order in the same group,
saving each one's result, or the error it raised, to
``OUT_DIR/<scenario>.<rank>.pt``. A scenario that fails on some rank must fail on all of them with
the same error and leave the group usable for the next one — which is what is tested.
"""

from __future__ import annotations

import importlib
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import nepenthe
import nepenthe.distributed
from nepenthe.data import load_dataset, make_loader
from nepenthe.masks import get_masks
from nepenthe.models import ResidualMLP


def rank() -> int:
    return nepenthe.distributed.rank()


def world() -> int:
    """The number of ranks (1 for the one-process reference)."""
    return nepenthe.distributed.world_size()


def shard(items: list) -> list:
    """This rank's items (``rank::world``)."""
    return items[rank()::world()]


def _measure_batches() -> list[torch.Tensor]:
    """Batches of unequal sizes, two of them empty: with 3 ranks, rank 2's shard holds no sample."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, 64, generator=g) for n in (7, 5, 0, 9, 3, 0)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return ResidualMLP(64, 10, width=8, hidden=8, depth=2)


_DATA = {}


def _digits():
    if not _DATA:
        splits = load_dataset("digits", limit=240)
        _DATA.update(train=list(make_loader(splits.train, 24)), val=list(make_loader(splits.val, 8)))
    return _DATA


def _same_retrain(model: nn.Module, iteration: int) -> None:
    """Every rank trains on all the training data the same way: the weights stay identical."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for x, y in _digits()["train"]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _ddp_retrain(model: nn.Module, iteration: int) -> None:
    """The usual way: DDP over each rank's shard of the training data, the same number of batches
    on every rank (as DistributedSampler gives; DDP itself hangs on uneven inputs without join())."""
    ddp = nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    ddp.train()
    batches = _digits()["train"]
    for x, y in shard(batches[:len(batches) // world() * world()]):
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()


def _global_accuracy(model: nn.Module) -> float:
    """Correct / total summed over the ranks' validation shards (the torchmetrics-with-sync way)."""
    model.eval()
    counts = torch.zeros(2, dtype=torch.int64)
    with torch.no_grad():
        for x, y in shard(_digits()["val"]):
            counts += torch.tensor([int((model(x).argmax(1) == y).sum()), len(y)])
    if dist.is_initialized():
        dist.all_reduce(counts)
    return 100.0 * int(counts[0]) / int(counts[1])


def _prune(retrain=_same_retrain, evaluate=_global_accuracy, **config) -> dict:
    model = _model()
    calib = shard(_digits()["train"])
    result = nepenthe.prune(model, calib, retrain=retrain, evaluate=evaluate,
                            config=nepenthe.PruneConfig(**{"max_iters": 3, "delta": None, "zeta": 0.4, **config}))
    return {"records": [(r.iteration, r.accuracy, r.sparsity, r.within_tolerance, r.failure, r.layer_entropy)
                        for r in result.iterations],
            "selected": result.selected, "stop": result.stop_reason,
            "masks": {k: v.clone() for k, v in get_masks(model).items()},
            "weights": {k: v.clone() for k, v in model.state_dict().items()},
            "histogram": dict(result.stats.histogram)}


def measure() -> dict:
    stats = nepenthe.measure(_model(), shard(_measure_batches()))
    return {"histogram": dict(stats.histogram), "entropy": stats.layer_entropy,
            "neuron_entropy": dict(stats.neuron_entropy)}


def measure_nan_on_rank_1() -> dict:
    batches = shard(_measure_batches())
    if rank() == 1:
        batches = [torch.full((4, 64), float("nan"))]
    return measure_with(batches)


def measure_no_batches_on_last_rank() -> dict:
    return measure_with([] if rank() == world() - 1 else shard(_measure_batches()))


def measure_with(batches) -> dict:
    return {"histogram": dict(nepenthe.measure(_model(), batches).histogram)}


def prune_same_retrain() -> dict:
    return _prune()


def prune_ddp_retrain() -> dict:
    return _prune(retrain=_ddp_retrain)


def prune_retrain_without_ddp() -> dict:
    def per_rank(model, iteration):  # each rank on its own shard, no gradient sync: weights drift apart
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for x, y in shard(_digits()["train"]):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return _prune(retrain=per_rank)


def prune_evaluate_fails_on_rank_1() -> dict:
    def evaluate(model):
        value = _global_accuracy(model)
        if rank() == 1 and model.training is False and any(m.sum() < m.numel() for m in get_masks(model).values()):
            raise ValueError("validation shard is corrupt")
        return value
    return _prune(evaluate=evaluate)


def prune_retrain_diverges_on_rank_1() -> dict:
    def retrain(model, iteration):
        _same_retrain(model, iteration)
        if rank() == 1 and iteration == 2:
            raise FloatingPointError("loss is nan")
    return _prune(retrain=retrain)


def prune_per_rank_accuracy() -> dict:
    """evaluate returns each rank's own shard accuracy: the loop decides with their mean."""
    def evaluate(model):
        model.eval()
        with torch.no_grad():
            pairs = [(int((model(x).argmax(1) == y).sum()), len(y)) for x, y in shard(_digits()["val"])]
        return 100.0 * sum(c for c, _ in pairs) / sum(n for _, n in pairs) + rank()  # ranks disagree on purpose
    return _prune(evaluate=evaluate, delta=1.0)


def prune_with_checkpoints_then_resume() -> dict:
    folder = Path(sys.argv[4]) / "checkpoints"
    first = _prune(checkpoint_dir=str(folder), max_iters=2)
    again = _prune(checkpoint_dir=str(folder), max_iters=3)  # resumes after iteration 2 on every rank
    return {"first": first["records"], "again": again["records"], "masks": again["masks"],
            "files": sorted(p.name for p in folder.iterdir())}


def _fsdp_model() -> nn.Module:
    """The same model, sharded by FSDP2 over the ranks (unsharded in the one-process reference)."""
    model = _model()
    if dist.is_initialized():
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    return model


def _gathered(model: nn.Module) -> dict:
    from nepenthe.sharded import full

    return {"masks": {k: full(v).clone() for k, v in sorted(get_masks(model).items())},
            "weights": {k: full(v).detach().clone() for k, v in sorted(model.state_dict().items())
                        if not k.endswith("_mask")}}


def fsdp_prune_step() -> dict:
    out = {}
    for method in ("nepenthe", "imp"):
        model = _fsdp_model()
        step = nepenthe.prune_step(model, shard(_digits()["train"]),
                                   config=nepenthe.PruneConfig(method=method, zeta=0.4))
        out[method] = {"pruned": step.pruned, **_gathered(model)}
    return out


def fsdp_prune_loop() -> dict:
    model = _fsdp_model()
    result = nepenthe.prune(model, shard(_digits()["train"]), retrain=_same_retrain, evaluate=_global_accuracy,
                            config=nepenthe.PruneConfig(max_iters=2, delta=None, zeta=0.4))
    return {"records": [(r.iteration, r.sparsity, r.layer_entropy) for r in result.iterations],
            "stop": result.stop_reason, **_gathered(model)}


def _fsdp_prune(folder: Path, max_iters: int) -> dict:
    model = _fsdp_model()
    result = nepenthe.prune(model, shard(_digits()["train"]), retrain=_same_retrain, evaluate=_global_accuracy,
                            config=nepenthe.PruneConfig(max_iters=max_iters, delta=None, zeta=0.4,
                                                        checkpoint_dir=str(folder)))
    return {"records": [(r.iteration, r.accuracy, r.sparsity, r.within_tolerance, r.failure, r.layer_entropy)
                        for r in result.iterations],
            "selected": result.selected, "stop": result.stop_reason, **_gathered(model)}


def fsdp_prune_with_checkpoints_then_resume() -> dict:
    """As prune_with_checkpoints_then_resume, on the FSDP2 model: rank 0 writes whole tensors, every
    rank resumes its shards from them."""
    folder = Path(sys.argv[4]) / "fsdp_checkpoints"
    first = _fsdp_prune(folder, 2)
    again = _fsdp_prune(folder, 3)  # resumes after iteration 2 on every rank
    return {"first": first["records"], "again": again["records"], "selected": again["selected"],
            "stop": again["stop"], "masks": again["masks"], "weights": again["weights"],
            "files": sorted(p.name for p in folder.iterdir())}


def fsdp_checkpoint_resumed_in_one_process() -> dict:
    """Run on request only (NEPENTHE_SCENARIOS), in one process: iterations 0-2 written by a multi-rank
    FSDP2 run (folder NEPENTHE_RESUME_FROM), resumed on the unsharded model up to iteration 3."""
    import shutil
    import warnings

    folder = Path(sys.argv[4]) / "fsdp_checkpoints"
    folder.mkdir()
    for k in range(3):
        shutil.copy(Path(os.environ["NEPENTHE_RESUME_FROM"]) / f"iter_{k:03d}.pt", folder)
    with warnings.catch_warnings():  # written by another number of ranks: its random states are not restored
        warnings.filterwarnings("ignore", r".* was written by \d+ rank", RuntimeWarning)
        again = _fsdp_prune(folder, 3)
    return {"records": again["records"], "selected": again["selected"], "stop": again["stop"],
            "masks": again["masks"], "weights": again["weights"]}


SCENARIOS = [measure, measure_nan_on_rank_1, measure_no_batches_on_last_rank, prune_same_retrain, prune_ddp_retrain,
             prune_retrain_without_ddp, prune_evaluate_fails_on_rank_1, prune_retrain_diverges_on_rank_1,
             prune_per_rank_accuracy, prune_with_checkpoints_then_resume, fsdp_prune_step, fsdp_prune_loop,
             fsdp_prune_with_checkpoints_then_resume]
ON_REQUEST = [fsdp_checkpoint_resumed_in_one_process]  # named in NEPENTHE_SCENARIOS


def main() -> None:
    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    torch.set_num_threads(1)
    if world > 0:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
    # another file's scenarios (tests/distributed/harness.launch names it)
    module = importlib.import_module(os.environ.get("NEPENTHE_SCENARIO_MODULE", "tests.distributed.worker"))
    try:
        only = os.environ.get("NEPENTHE_SCENARIOS")  # a comma-separated subset (ON_REQUEST ones included)
        everything = [*module.SCENARIOS, *getattr(module, "ON_REQUEST", [])]
        chosen = [s for s in everything if s.__name__ in only.split(",")] if only else module.SCENARIOS
        for scenario in chosen:
            print(f"rank {rank}: {scenario.__name__}", flush=True)
            try:
                result = {"ok": scenario()}
            except Exception as exc:  # noqa: BLE001 - recorded for the test to compare across ranks
                result = {"error": type(exc).__name__, "message": str(exc)}
            torch.save(result, out / f"{scenario.__name__}.{rank}.pt")
        if world > 0:
            dist.barrier()  # leave together (see nepenthe.cli: gloo may abort a rank still finishing)
    finally:
        if world > 0:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Every result is saved and the group destroyed: leave without the interpreter's teardown, where
    # gloo objects still referenced from elsewhere (a device mesh cache) were seen, rarely, to abort
    # a finished rank ("terminate called without an active exception") and fail the test for nothing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
