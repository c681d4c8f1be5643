"""Activation modules of other libraries are rectifiers by what they compute (no class names): a
Hugging Face-style GELUActivation / NewGELUActivation, a user's Swish, a leaky ReLU written by hand;
they are measured and folded like torch.nn's own; unknown ones can be registered."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nepenthe
from nepenthe.activations import Rectifier, rectifier_of_module, register_rectifier
from nepenthe.graph import find_sites, trace


class GELUActivation(nn.Module):  # the shape of transformers.activations.GELUActivation
    def __init__(self):
        super().__init__()
        self.act = F.gelu

    def forward(self, x):
        return self.act(x)


class NewGELUActivation(nn.Module):  # transformers' tanh form, written out
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class HandLeaky(nn.Module):
    def forward(self, x):
        return torch.where(x > 0, x, 0.2 * x)


class QuickGELU(nn.Module):  # x * sigmoid(1.702 x): none of ours
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def test_recognised_by_what_they_compute():
    assert rectifier_of_module(GELUActivation()) == Rectifier("gelu", exact=False)
    assert rectifier_of_module(NewGELUActivation()) == Rectifier("gelu", exact=False, approximate="tanh")
    assert rectifier_of_module(Swish()) == Rectifier("silu", exact=False)
    leaky = rectifier_of_module(HandLeaky())
    assert leaky.kind == "leaky_relu" and leaky.off_slope == pytest.approx(0.2)
    assert rectifier_of_module(QuickGELU()) is None
    assert rectifier_of_module(nn.Linear(2, 2)) is None and rectifier_of_module(nn.Tanh()) is None


def test_register_rectifier_for_what_the_probe_cannot_see():
    class ScaledReLU(nn.Module):  # a parameter: never probed
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return F.relu(x)

    assert rectifier_of_module(ScaledReLU()) is None
    register_rectifier(ScaledReLU, Rectifier("relu"))
    try:
        assert rectifier_of_module(ScaledReLU()) == Rectifier("relu")
    finally:
        from nepenthe import activations
        activations._REGISTERED.pop(ScaledReLU)
        activations._RECOGNISED.clear()


@pytest.mark.parametrize("act", [GELUActivation, NewGELUActivation, Swish, HandLeaky])
def test_foreign_activations_are_one_call_site_measured_and_folded(act):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), act(), nn.Linear(16, 3))
    sites = find_sites(trace(model))
    assert [s.name for s in sites] == ["1"] and sites[0].module_path == "1"
    x = torch.randn(64, 6)
    stats = nepenthe.measure(model, [x])
    assert list(stats.histogram) == ["1"] and int(stats.histogram["1"].sum()) >= 64 * 16
    # every neuron ON: linear on the data, so the MLP folds into one Linear, up to the activation's
    # own approximation (exact for the leaky ReLU)
    with torch.no_grad():
        model[0].bias.fill_(50.0)
    stats = nepenthe.measure(model, [x])
    folded = nepenthe.fold(model, stats, x, approximate=True, planner="all", verify=False)
    assert sum(isinstance(m, nn.Linear) for m in folded.modules()) == 1
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
