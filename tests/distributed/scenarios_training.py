"""Scenarios of tests/distributed/test_training.py: ``nepenthe.train`` under DDP when one rank fails
mid-epoch (a corrupt sample, a failing forward, a NaN loss, fewer batches than the others). Every
rank must raise the same error at the same step, and the group must stay usable for the next
scenario (the worker runs them all in one group)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import nepenthe
from nepenthe.distributed import digest
from tests.distributed.worker import _model, rank, shard, world

_CFG = nepenthe.TrainConfig(epochs=2, lr=0.05, schedule="constant")


def _tensors(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


class _CorruptAt(Dataset):
    """The samples of _tensors(), sample ``bad`` unreadable (DistributedSampler without shuffling
    gives sample i to rank i % world)."""

    def __init__(self, bad: int):
        self.x, self.y = _tensors()
        self.bad = bad

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        if i == self.bad:
            raise ValueError(f"sample {i} is corrupt")
        return self.x[i], self.y[i]


class _FailsOnRank1(nn.Module):
    """The model, whose forward fails (or gives NaN) on rank 1 at its ``at``-th call."""

    def __init__(self, at: int, nan: bool = False):
        super().__init__()
        self.net, self.at, self.nan, self.calls = _model(), at, nan, 0

    def forward(self, x):
        self.calls += 1
        if rank() == 1 and self.calls == self.at:
            if not self.nan:
                raise RuntimeError("CUDA out of memory (simulated)")
            x = x * float("nan")
        return self.net(x)


class _Stream(IterableDataset):
    """A stream whose length says 24 samples on every rank, but rank 1 runs dry after 16."""

    def __len__(self) -> int:
        return 24

    def __iter__(self):
        x, y = _tensors(24)
        yield from zip(x[:16 if rank() == 1 else 24], y[:16 if rank() == 1 else 24])


def _train(model: nn.Module, loader) -> dict:
    losses = nepenthe.train(model, loader, _CFG)
    return {"losses_len": len(losses), "weights": digest(model.parameters())}


def train_in_step() -> dict:
    """The reference: every rank ends with the same weights."""
    return _train(_model(), DataLoader(TensorDataset(*_tensors()), batch_size=8))


def train_sample_corrupt_on_rank_1() -> dict:
    return _train(_model(), DataLoader(_CorruptAt(bad=21), batch_size=4))  # batch 2 of rank 1's shard


def train_forward_fails_on_rank_1() -> dict:
    return _train(_FailsOnRank1(at=3), DataLoader(TensorDataset(*_tensors()), batch_size=8))


def train_nan_on_rank_1() -> dict:
    return _train(_FailsOnRank1(at=2, nan=True), DataLoader(TensorDataset(*_tensors()), batch_size=8))


def train_fewer_batches_on_rank_1() -> dict:
    """Per-rank lists of batches (not shardable), rank 1's shorter: refused before any step."""
    x, y = _tensors()
    batches = list(zip(x.split(8), y.split(8)))
    return _train(_model(), batches[:-1] if rank() == 1 else batches)


def train_stream_runs_dry_on_rank_1() -> dict:
    return _train(_model(), DataLoader(_Stream(), batch_size=8))


def user_ddp_loop_fails_on_rank_1() -> dict:
    """A user's own DDP loop in the documented pattern (docs/reference/loop.md): batches through
    agreed_batches, the forward inside agreed; rank 1's forward fails at its second batch."""
    from torch.distributed import is_initialized

    from nepenthe.distributed import agreed, agreed_batches

    model = _FailsOnRank1(at=2)
    ddp = nn.parallel.DistributedDataParallel(model) if is_initialized() else model
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for x, y in agreed_batches(DataLoader(TensorDataset(*_tensors()), batch_size=8), "my training data"):
        with agreed("my forward"):
            loss = nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"weights": digest(model.parameters())}


def prune_retrain_fails_mid_epoch_on_rank_1() -> dict:
    """The loop with nepenthe.train as retrain; rank 1's data breaks in iteration 1's retraining."""
    model = _model()
    x, y = _tensors()
    calib = shard([x[i:i + 8] for i in range(0, 48, 8)])

    def retrain(m, iteration):
        nepenthe.train(m, DataLoader(_CorruptAt(bad=21 if iteration == 1 else -1), batch_size=4), _CFG)

    result = nepenthe.prune(model, calib, retrain=retrain, evaluate=lambda m: 50.0,
                            config=nepenthe.PruneConfig(max_iters=2, delta=None, zeta=0.3))
    return {"stop": result.stop_reason, "world": world()}


def train_in_step_again() -> dict:
    """After the failures: the group still works (the same weights as the first time)."""
    return train_in_step()


SCENARIOS = [train_in_step, train_sample_corrupt_on_rank_1, train_forward_fails_on_rank_1, train_nan_on_rank_1,
             train_fewer_batches_on_rank_1, train_stream_runs_dry_on_rank_1, user_ddp_loop_fails_on_rank_1,
             prune_retrain_fails_mid_epoch_on_rank_1, train_in_step_again]
