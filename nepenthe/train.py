"""A small built-in trainer: enough for the main job and the paper's recipes, replaceable by any
user function (the pruning loop only needs ``retrain(model, iteration)`` and ``evaluate(model)``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .masks import masked_optimizer


@dataclass
class TrainConfig:
    """Optimisation recipe. Defaults are short CPU-friendly runs; SPEC §3 lists the paper's."""

    epochs: int = 10
    lr: float = 0.05
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | multistep | constant
    milestones: list[int] = field(default_factory=list)  # for multistep, in epochs
    gamma: float = 0.1
    label_smoothing: float = 0.0
    grad_clip: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The fused masked optimizer of ``cfg``: the model's masks are applied inside every step."""
    if cfg.optimizer == "sgd":
        return masked_optimizer(model, "sgd", lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return masked_optimizer(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use 'sgd' or 'adamw'")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = max(cfg.epochs * steps_per_epoch, 1)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if cfg.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[m * steps_per_epoch for m in cfg.milestones], gamma=cfg.gamma)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; use 'cosine', 'multistep' or 'constant'")


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train(model: nn.Module, loader: DataLoader, cfg: TrainConfig, *, progress=None) -> list[float]:
    """Train in place with a fresh optimizer and schedule; the fused masked optimizer keeps masks enforced.

    Returns the mean training loss of each epoch. ``progress`` is an optional callable called
    with (epoch, loss) after each epoch.
    """
    device = _device_of(model)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, len(loader))
    losses = []
    model.train()
    try:
        for epoch in range(cfg.epochs):
            total, count = 0.0, 0
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"training loss became {loss.item()} at epoch {epoch}; lower the learning rate "
                        f"(now {cfg.lr}) or enable grad_clip")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(y)
                count += len(y)
            losses.append(total / max(count, 1))
            if progress is not None:
                progress(epoch, losses[-1])
    finally:
        model.eval()
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy in percent."""
    device = _device_of(model)
    was_training = model.training
    model.eval()
    correct, total = 0, 0
    for x, y in loader:
        pred = model(x.to(device)).argmax(dim=1)
        correct += int((pred == y.to(device)).sum())
        total += len(y)
    model.train(was_training)
    if total == 0:
        raise ValueError("evaluation data is empty")
    return 100.0 * correct / total
