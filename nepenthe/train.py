"""A small built-in trainer: enough for the main job and the paper's recipes, replaceable by any
user function (the pruning loop only needs ``retrain(model, iteration)`` and ``evaluate(model)``).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from . import distributed as ranks
from .loop.masked_training import masked_optimizer

__all__ = ["evaluate", "make_optimizer", "make_scheduler", "train", "TrainConfig"]


@dataclass
class TrainConfig:
    """Optimisation recipe. Defaults are short CPU-friendly runs; docs/method.md §3 lists the paper's."""

    epochs: float = 10  # may be fractional: 0.5 = half the batches of one epoch
    lr: float = 0.05
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | multistep | constant
    milestones: list[float] = field(default_factory=list)  # for multistep, in epochs
    gamma: float = 0.1
    label_smoothing: float = 0.0
    grad_clip: float | None = None

    def __post_init__(self):
        if not self.epochs >= 0:  # also refuses NaN
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def to_dict(self) -> dict:
        return asdict(self)

    def scaled(self, factor: float) -> TrainConfig:
        """The same recipe with every duration (epochs, milestones) multiplied by ``factor``."""
        return replace(self, epochs=self.epochs * factor, milestones=[m * factor for m in self.milestones])

    def steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the whole run (fractional epochs round to whole steps, at least one
        when ``epochs > 0``)."""
        return max(round(self.epochs * steps_per_epoch), 1) if self.epochs > 0 else 0


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The fused masked optimizer of ``cfg``: the model's masks are applied inside every step."""
    if cfg.optimizer == "sgd":
        return masked_optimizer(model, "sgd", lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return masked_optimizer(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use 'sgd' or 'adamw'")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = max(cfg.steps(steps_per_epoch), 1)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if cfg.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=sorted(round(m * steps_per_epoch) for m in cfg.milestones), gamma=cfg.gamma)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; use 'cosine', 'multistep' or 'constant'")


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class _Shards:
    """Under torchrun: this rank's share of a training loader, DistributedSampler-style. Every rank
    gets ceil(N / world) samples (the first ones repeated to fill the last round), hence the same
    number of batches: DDP waits in every backward for all ranks, so uneven shards would hang it.
    The order is reshuffled each epoch (``set_epoch``) from a seed drawn once per ``train`` call from
    the loader's own generator: the same on every rank (they seed it alike), new at each retraining,
    and restored on resume with the loader's generator (``prune(rng_generators=[loader])``)."""

    def __init__(self, loader: DataLoader):
        shuffle = isinstance(loader.sampler, RandomSampler)
        seed = 0
        if shuffle:
            seed = int(torch.randint(2**62, (1,), generator=loader.generator)) if loader.generator is not None \
                else int(torch.randint(2**62, (1,)))
        self.sampler = DistributedSampler(loader.dataset, num_replicas=ranks.world_size(), rank=ranks.rank(),
                                          shuffle=shuffle, seed=seed, drop_last=False)
        self.loader = ranks.resampled(loader, self.sampler)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)


def _data_parallel(model: nn.Module, loader):
    """(the module to call, the batches to train on): under an initialised process group of several
    ranks, the model wrapped in DistributedDataParallel (gradients averaged, so the weights stay the
    same on every rank) and the loader sharded over the ranks; otherwise both as they are."""
    if not ranks.is_active():
        return model, loader
    device = _device_of(model)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # anything else (a list of batches) is the same on every rank: DDP averages equal gradients
    return ddp, _Shards(loader) if ranks.shardable(loader) else loader


def _same_length_on_every_rank(loader) -> None:
    """Under DDP every rank must take the same number of steps (each backward waits for all of
    them): loaders of different lengths (per-rank lists of batches, say) are refused on every rank
    before the first step, naming the lengths. One collective per ``train`` call."""
    if not ranks.is_active():
        return
    try:
        length = len(loader)
    except TypeError:  # no length (an iterable dataset): agreed_batches checks each batch instead
        length = None
    lengths: list = [None] * ranks.world_size()
    torch.distributed.all_gather_object(lengths, length)
    if len(set(lengths)) > 1:
        listed = ", ".join(f"rank {r}: {n}" for r, n in enumerate(lengths))
        raise ValueError(f"the training loader has a different number of batches on each rank ({listed}); under "
                         "torchrun every rank must take the same number of steps: pass a map-style DataLoader, "
                         "which nepenthe.train splits with a DistributedSampler, or equal per-rank batches")


def train(model: nn.Module, loader: DataLoader, cfg: TrainConfig, *, progress=None) -> list[float]:
    """Train in place with a fresh optimizer and schedule; the fused masked optimizer keeps masks enforced.

    Returns the mean training loss of each epoch (a fractional last epoch counts as one).
    ``progress`` is an optional callable called with (epoch, loss) after each epoch. A NaN/Inf
    loss raises ``FloatingPointError`` (the pruning loop takes it as a failed step and backs off).
    Under torchrun (an initialised process group of several ranks) the model trains through
    DistributedDataParallel on this rank's shard of ``loader`` (see :class:`_Shards`); the losses
    are this rank's.
    """
    device = _device_of(model)
    net, loader = _data_parallel(model, loader)
    _same_length_on_every_rank(loader)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, len(loader))
    steps_left = cfg.steps(len(loader))
    losses = []
    model.train()
    try:
        epoch = 0
        while steps_left > 0:
            total, count = 0.0, 0
            # Every rank decides together whether it goes on, once per step, before the backward (where
            # DDP waits for every rank): whether its forward failed or gave a NaN/Inf loss, and whether
            # it could fetch its next batch (fetched ahead: DDP's forward broadcasts buffers, a
            # collective that a rank which failed to fetch would never join).
            batches = ranks.AgreedBatches(loader, f"training (epoch {epoch})")
            item, _ = batches.advance()
            while item is not batches.END and steps_left > 0:
                loss, error = None, None
                try:
                    x, y = (t.to(device) for t in item)
                    loss = F.cross_entropy(net(x), y, label_smoothing=cfg.label_smoothing)
                except Exception as exc:  # noqa: BLE001 - handed to every rank by advance
                    error = exc
                finite = error is not None or bool(torch.isfinite(loss.detach()).all())
                item, (nonfinite,) = batches.advance(error, [not finite])
                if nonfinite:  # FloatingPointError on every rank: the pruning loop backs off
                    where = f"loss became {loss.item()}" if not finite else "loss became NaN/Inf on another rank"
                    raise FloatingPointError(f"training {where} at epoch {epoch}; lower the learning rate (now "
                                             f"{cfg.lr}) or enable grad_clip")
                steps_left -= 1
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(y)
                count += len(y)
            if count == 0:
                raise ValueError("the training data is empty; pass a non-empty DataLoader")
            losses.append(total / count)
            if progress is not None:
                progress(epoch, losses[-1])
            epoch += 1
    finally:
        model.eval()
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, *, over_ranks: bool = True) -> float:
    """Top-1 accuracy in percent.

    Under torchrun (``over_ranks`` and a process group of several ranks) each rank evaluates its
    share of ``loader`` (:func:`nepenthe.distributed.shard_loader`) and the correct / total counts
    are summed over the ranks: every rank returns the accuracy on the whole data. ``over_ranks=False``
    evaluates all of it on this rank alone, with no collective (what rank 0 does on its own)."""
    device = _device_of(model)
    model = getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
    together = over_ranks and ranks.is_active()
    was_training = model.training
    model.eval()
    correct, total = 0, 0
    with ranks.agreed("evaluate") if together else contextlib.nullcontext():
        try:
            for x, y in ranks.shard_loader(loader) if together else loader:
                pred = model(x.to(device)).argmax(dim=1)
                correct += int((pred == y.to(device)).sum())
                total += len(y)
        finally:
            model.train(was_training)
    if together:  # after the agreed block: no rank can be left waiting in it
        counts = torch.tensor([correct, total], dtype=torch.int64, device=ranks.collective_device())
        torch.distributed.all_reduce(counts)
        correct, total = int(counts[0]), int(counts[1])
    if total == 0:
        raise ValueError("evaluation data is empty")
    return 100.0 * correct / total
