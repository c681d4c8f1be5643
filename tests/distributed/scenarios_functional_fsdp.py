"""Scenarios of tests/distributed/test_functional_fsdp.py (run by tests/distributed/worker.py): an
FSDP2 model whose rectifiers are mostly functional calls (``F.relu(x)``, ``x.relu()``, inplace),
measured and pruned on each rank's shard of the data; the one-process reference (WORLD 0) runs the
same model unsharded, through the torch.fx graph route."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import nepenthe
from tests.distributed.worker import _digits, _measure_batches, shard


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + F.relu(self.fc(x), inplace=True)


class FunctionalNet(nn.Module):
    """Functional rectifiers in the root and in FSDP2-sharded blocks, one module rectifier."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(64, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(2))
        self.fc2 = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.fc3 = nn.Linear(width, width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.fc1(x.flatten(1)).relu()
        for block in self.blocks:
            x = block(x)
        x = self.act(self.fc2(x))
        x = torch.relu(self.fc3(x))
        return self.head(x)


def _model() -> nn.Module:
    """Sharded per block and at the root over the ranks; unsharded in the one-process reference."""
    torch.manual_seed(0)
    model = FunctionalNet()
    if dist.is_initialized():
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    return model


def functional_measure() -> dict:
    stats = nepenthe.measure(_model(), shard(_measure_batches()))
    return {"names": list(stats.histogram), "histogram": dict(stats.histogram),
            "neuron_entropy": dict(stats.neuron_entropy), "entropy": stats.layer_entropy,
            "sites": {k: (s.rectifier, s.channel_dim, s.producer, s.module_path) for k, s in stats.sites.items()
                      if s.module_path is None}}


def functional_prune_step() -> dict:
    from nepenthe.masks import get_masks
    from nepenthe.sharded import full

    model = _model()
    step = nepenthe.prune_step(model, shard(_digits()["train"]), config=nepenthe.PruneConfig(zeta=0.4))
    return {"pruned": step.pruned, "masks": {k: full(v).clone() for k, v in sorted(get_masks(model).items())}}


SCENARIOS = [functional_measure, functional_prune_step]
