"""The benchmark's scenarios: the paper's models (and an MLP block) built without training in the
state pruning would leave them in — chosen rectifiers declared linear, some convolutions emptied."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..entropy import EntropyStats
from ..fold import fold
from ..fold.preview import empty_layers, forced_stats
from ..models import mobilenet_v2_cifar, resnet18_cifar, vgg16_bn_cifar

__all__ = ["SCENARIOS", "available_scenarios", "BuiltScenario", "fold_arguments", "get_scenario", "MLPBlock",
           "Scenario"]


class MLPBlock(nn.Module):
    """A transformer MLP block on tokens: ``fc2(act(fc1(x)))`` with GELU, ``[batch, tokens, dim]``."""

    def __init__(self, dim: int = 384, hidden: int = 1536):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@dataclass
class BuiltScenario:
    """What a scenario gives at one batch size: the model, its statistics, an input, fold's kwargs."""

    model: nn.Module
    stats: EntropyStats
    example_input: torch.Tensor
    fold_kwargs: dict


@dataclass(frozen=True)
class Scenario:
    """A pruned model without training: ``states`` forced on call sites, ``empty`` convs zeroed.

    ``fold_kwargs`` go to :func:`nepenthe.fold` (``planner`` only where fold has it);
    ``expected_removed`` is the number of rectifier layers folding must remove.
    """

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one sample, without the batch dimension
    states: Mapping[str, str]
    expected_removed: int
    empty: tuple[str, ...] = ()
    fold_kwargs: Mapping[str, object] = field(default_factory=dict)
    seed: int = 0

    def model(self, device: torch.device | str = "cpu") -> nn.Module:
        """The model in eval mode: seeded init, BatchNorm given non-trivial statistics, ``empty`` zeroed."""
        torch.manual_seed(self.seed)
        model = self.make_model()
        _randomize_batchnorm(model, torch.Generator().manual_seed(self.seed + 1))
        empty_layers(model, self.empty)
        return model.to(device).eval()

    def example_input(self, batch: int, device: torch.device | str = "cpu", seed: int | None = None) -> torch.Tensor:
        if batch < 1:
            raise ValueError(f"batch sizes must be >= 1, got {batch}")
        gen = torch.Generator().manual_seed(self.seed + 2 if seed is None else seed)
        return torch.randn((batch, *self.input_shape), generator=gen).to(device)

    def stats(self, model: nn.Module) -> EntropyStats:
        """Forced statistics: ``states`` on the named call sites, every other call site mixed."""
        device = next(model.parameters()).device
        return forced_stats(model, self.example_input(2, device, seed=self.seed + 3), dict(self.states))

    def build(self, batch: int, device: torch.device | str = "cpu", **fold_overrides) -> BuiltScenario:
        model = self.model(device)
        return BuiltScenario(model, self.stats(model), self.example_input(batch, device),
                             fold_arguments({**self.fold_kwargs, **fold_overrides}))


def fold_arguments(kwargs: Mapping[str, object]) -> dict:
    """``kwargs`` without those this version of :func:`nepenthe.fold` does not take (e.g. ``planner``)."""
    accepted = inspect.signature(fold).parameters
    return {k: v for k, v in kwargs.items() if k in accepted}


@torch.no_grad()
def _randomize_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    # a freshly built BN is the identity; trained ones are not, and folding must fuse them exactly
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.track_running_stats:
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
            m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)


_RESNET_EMPTY_BLOCKS = ("layer1.1", "layer2.1", "layer3.1", "layer4.1")
# residual inverted-residual blocks (stride 1, same channels): the last one of each repeated group


_MOBILENET_LINEAR_BLOCKS = ("features.3", "features.6", "features.10", "features.13", "features.16")
# every other ReLU of VGG-16-bn's stages 3-5 (call sites are the ReLU modules' paths)


_VGG_LINEAR_SITES = ("features.19", "features.26", "features.32", "features.39")


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "resnet18",
            "CIFAR ResNet-18, conv1+conv2 of the second block of each stage emptied, their relu1 linear",
            resnet18_cifar, (3, 32, 32),
            states={f"{b}.relu1": "on" for b in _RESNET_EMPTY_BLOCKS}, expected_removed=4,
            empty=tuple(f"{b}.conv{i}" for b in _RESNET_EMPTY_BLOCKS for i in (1, 2)),
            fold_kwargs={"planner": "latency"}),
        Scenario(
            "mobilenet_v2",
            "CIFAR MobileNetV2, both ReLU6 of 5 residual inverted-residual blocks linear",
            mobilenet_v2_cifar, (3, 32, 32),
            states={f"{b}.{part}.act": "on" for b in _MOBILENET_LINEAR_BLOCKS for part in ("expand", "depthwise")},
            expected_removed=2 * len(_MOBILENET_LINEAR_BLOCKS), fold_kwargs={"planner": "latency"}),
        Scenario(
            "vgg16_bn",
            "CIFAR VGG-16-bn, every other ReLU of stages 3-5 linear",
            vgg16_bn_cifar, (3, 32, 32),
            states={s: "on" for s in _VGG_LINEAR_SITES}, expected_removed=len(_VGG_LINEAR_SITES),
            fold_kwargs={"planner": "latency"}),
        Scenario(
            "mlp_block",
            "transformer MLP block Linear(384,1536)-GELU-Linear(1536,384) on 64 tokens, GELU linear (approximate)",
            MLPBlock, (64, 384),
            states={"act": "on"}, expected_removed=1, fold_kwargs={"approximate": True, "planner": "latency"}),
    )
}


def available_scenarios() -> tuple[str, ...]:
    return tuple(SCENARIOS)


def get_scenario(name: str | Scenario) -> Scenario:
    if isinstance(name, Scenario):
        return name
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    return SCENARIOS[name]
