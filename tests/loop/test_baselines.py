"""The baselines against their papers' rules, each on a case small enough to check by hand:
IMP (one global magnitude threshold at a fixed rate), EGP (its entropy estimator and the
entropy-weighted budget), EASIER (the lowest per-batch-averaged entropy activation becomes the
identity), and ReLU6 as a two-state unit (the EGP/EASIER convention)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from nepenthe import PruneConfig, fold, measure, prune
from nepenthe.masks import get_mask


def binary_entropy(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def no_retrain(model, iteration):
    pass


def constant_accuracy(model):
    return 50.0


def run_one(model, data, method, **config):
    # select="last": these tests look at the step itself, whatever iteration a depth rule would keep
    return prune(model, data, retrain=no_retrain, evaluate=constant_accuracy,
                 config=PruneConfig(method=method, max_iters=1, delta=None, select="last", **config))


# --------------------------------------------------------------------------------------------------
# IMP: global magnitude, fixed rate
# --------------------------------------------------------------------------------------------------


def test_imp_prunes_the_globally_smallest_weights():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 4.0]]))
        model[2].weight.copy_(torch.tensor([[0.5, 5.0], [-6.0, 7.0]]))
    # 8 weights, ζ = 0.5: the 4 smallest |w| are 0.5 (second layer), 1, 2, 3 (first layer)
    result = run_one(model, [torch.randn(4, 2)], "imp")
    assert get_mask(model[0]).tolist() == [[False, False], [False, True]]
    assert get_mask(model[2]).tolist() == [[False, True], [True, True]]
    assert result.iterations[1].pruned == {"0": 3, "2": 1}
    # the second round prunes half of the 4 left: 4 (first) and 5 (second)
    run_one(model, [torch.randn(4, 2)], "imp")
    assert int(get_mask(model[0]).sum()) + int(get_mask(model[2]).sum()) == 2


# --------------------------------------------------------------------------------------------------
# Entropy estimators: EGP, EASIER, NEPENTHE on the same data
# --------------------------------------------------------------------------------------------------


def two_neuron_model() -> nn.Module:
    """z = (x, -x): neuron 0 sees x, neuron 1 sees -x."""
    model = nn.Sequential(nn.Linear(1, 2, bias=False), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
    return model


BATCHES = [torch.tensor([[1.0], [-1.0]]), torch.tensor([[1.0], [1.0]]), torch.tensor([[0.0], [2.0]])]


def test_egp_entropy_is_the_batch_mean_of_mixed_neurons_with_zero_as_off():
    # batch 1: both neurons ON/OFF once -> H = 1, 1; mixed mean 1
    # batch 2: neuron 0 always ON, neuron 1 always OFF -> no mixed neuron -> 0
    # batch 3: z0 = (0, 2) -> (OFF, ON) with zero as OFF: H = 1; z1 = (0, -2) -> OFF, OFF: 0 -> mixed mean 1
    # EGP: (1 + 0 + 1) / 3
    stats = measure(two_neuron_model(), BATCHES, zero_as="off", aggregate="mixed_mean", estimator="batch_mean")
    assert stats.layer_entropy["1"] == pytest.approx(2 / 3)
    result = run_one(two_neuron_model(), BATCHES, "egp")
    assert result.iterations[0].layer_entropy["1"] == pytest.approx(2 / 3)


def test_easier_entropy_is_the_batch_mean_over_all_neurons_with_zero_as_on():
    # batch 1: 1, 1 -> 1; batch 2: 0, 0 -> 0; batch 3: z0 = (0, 2) -> ON, ON: 0; z1 = (0, -2) -> ON, OFF: 1 -> 0.5
    # EASIER: (1 + 0 + 0.5) / 3
    stats = measure(two_neuron_model(), BATCHES, zero_as="on", aggregate="mean", estimator="batch_mean")
    assert stats.layer_entropy["1"] == pytest.approx(0.5)
    model = two_neuron_model()
    result = prune(model, BATCHES, retrain=no_retrain, evaluate=constant_accuracy,
                   config=PruneConfig(method="easier", max_iters=0, delta=None))
    assert result.iterations[0].layer_entropy["1"] == pytest.approx(0.5)


def test_nepenthe_entropy_is_pooled_with_zeros_excluded():
    # neuron 0: z = 1, -1, 1, 1, 0, 2 -> 4 ON, 1 OFF (the zero is excluded) -> H(0.8); neuron 1 mirrors it
    stats = measure(two_neuron_model(), BATCHES)
    assert stats.layer_entropy["1"] == pytest.approx(binary_entropy(0.8))
    result = run_one(two_neuron_model(), BATCHES, "nepenthe")
    assert result.iterations[0].layer_entropy["1"] == pytest.approx(binary_entropy(0.8))


# --------------------------------------------------------------------------------------------------
# EGP's budget on two layers
# --------------------------------------------------------------------------------------------------


class TwoBranches(nn.Module):
    """head(relu_a(a(x[:, :1])) + relu_b(b(x[:, 1:]))): two rectifier layers with their own inputs."""

    def __init__(self, width_a: int = 4, width_b: int = 4):
        super().__init__()
        self.a, self.b = nn.Linear(1, width_a, bias=False), nn.Linear(1, width_b, bias=False)
        self.relu_a, self.relu_b = nn.ReLU(), nn.ReLU()
        self.head = nn.Linear(width_a, 1)

    def forward(self, x):
        return self.head(self.relu_a(self.a(x[:, :1])) + self.relu_b(self.b(x[:, 1:])))


def test_egp_budget_by_hand():
    model = TwoBranches()
    with torch.no_grad():
        model.a.weight.copy_(torch.tensor([[1.0], [2.0], [3.0], [4.0]]))   # mean |w| 2.5
        model.b.weight.copy_(torch.tensor([[0.5], [0.5], [0.5], [-0.5]]))  # mean |w| 0.5
    # x_a = +-1 alternately in every batch: every neuron of a is ON half the time -> H_a = 1
    # x_b = 1 throughout: neurons 0-2 always ON, neuron 3 always OFF -> H_b = 0 -> b is frozen
    batches = [torch.tensor([[1.0, 1.0], [-1.0, 1.0]])] * 2
    result = run_one(model, batches, "egp", zeta=0.5)
    assert result.iterations[0].layer_entropy == {"relu_a": 1.0, "relu_b": 0.0}
    # L = {a}: B = floor(0.5 * 4) = 2, all to a: its two smallest weights (1, 2)
    assert result.iterations[1].pruned == {"a": 2, "b": 0}
    assert get_mask(model.a).reshape(-1).tolist() == [False, False, True, True]
    # now with x_b = +-1 as well: H_a = H_b = 1; I = H * mean|w| = (2.5, 0.5); R = (3/2.5, 3/0.5) = (1.2, 6)
    # share_b = e^6 / (e^1.2 + e^6) = 0.99184 -> B = floor(0.5 * 8) = 4: b's 3.967 < 4 -> largest remainder:
    # a: 0.0326 -> 0, b: 3.967 -> 4
    model = TwoBranches()
    with torch.no_grad():
        model.a.weight.copy_(torch.tensor([[1.0], [2.0], [3.0], [4.0]]))
        model.b.weight.copy_(torch.tensor([[0.5], [0.5], [0.5], [-0.5]]))
    batches = [torch.tensor([[1.0, 1.0], [-1.0, -1.0]])] * 2
    result = run_one(model, batches, "egp", zeta=0.5, cut_max_sparsity=None)
    share_b = math.exp(6) / (math.exp(1.2) + math.exp(6))
    assert 4 * share_b == pytest.approx(3.967, abs=1e-3)
    assert result.iterations[1].pruned == {"a": 0, "b": 4}


def test_cut_check_caps_one_of_two_branches_that_cut_only_together():
    # both branches emptied would disconnect the head from the input; either one alone does not
    model = TwoBranches()
    batches = [torch.tensor([[1.0, 1.0], [-1.0, -1.0]])] * 2
    result = run_one(model, batches, "nepenthe", zeta=1.0)
    record = result.iterations[1]
    assert record.capped == {"a": 1}  # the first in model order keeps ceil(1 % of 4) = 1 weight
    assert record.layer_sparsity == {"a": 0.75, "b": 1.0}


# --------------------------------------------------------------------------------------------------
# EASIER: the lowest per-batch-averaged entropy goes first
# --------------------------------------------------------------------------------------------------


def test_easier_picks_the_lowest_batch_mean_entropy_not_the_lowest_pooled_one():
    model = TwoBranches(1, 1)
    with torch.no_grad():
        model.a.weight.fill_(1.0)
        model.b.weight.fill_(1.0)
    # a: all ON in batch 1, all OFF in batch 2 -> per batch 0 (batch mean 0), pooled 1
    # b: 3 ON / 1 OFF in each batch -> H(0.75) = 0.811 either way
    b1 = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, -1.0]])
    b2 = torch.tensor([[-1.0, 1.0], [-1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0]])
    pooled = measure(model, [b1, b2], zero_as="on")
    assert pooled.layer_entropy == pytest.approx({"relu_a": 1.0, "relu_b": binary_entropy(0.75)})
    result = prune(model, [b1, b2], retrain=no_retrain, evaluate=constant_accuracy,
                   config=PruneConfig(method="easier", max_iters=1, delta=None, select="last"))
    assert result.iterations[0].layer_entropy == pytest.approx({"relu_a": 0.0, "relu_b": binary_entropy(0.75)})
    assert result.iterations[1].linearized == ["relu_a"]
    assert isinstance(model.relu_a, nn.Identity) and isinstance(model.relu_b, nn.ReLU)


# --------------------------------------------------------------------------------------------------
# ReLU6: three states (NEPENTHE) or two (EGP/EASIER code)
# --------------------------------------------------------------------------------------------------


def relu6_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.ReLU6(), nn.Linear(1, 1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    return model


def test_relu6_two_state_entropy_counts_saturation_as_on():
    data = [torch.tensor([[1.0], [7.0]])]  # one linear, one saturated observation
    three = measure(relu6_model(), data)
    two = measure(relu6_model(), data, saturation=False)
    assert three.layer_entropy["1"] == pytest.approx(1.0) and two.layer_entropy["1"] == 0.0
    assert torch.equal(three.histogram["1"], two.histogram["1"])  # the counts are the same facts
    assert two.options.saturation is False and three.options.saturation is True
    batch = measure(relu6_model(), data, saturation=False, estimator="batch_mean")
    assert batch.layer_entropy["1"] == 0.0


def test_two_state_zero_entropy_relu6_is_not_folded_as_linear():
    """Two-state zero entropy does not mean affine: fold goes by the counts and keeps the kink."""
    model = relu6_model().eval()
    data = torch.tensor([[1.0], [7.0], [3.0]])
    stats = measure(model, [data], saturation=False)
    assert stats.zero_entropy_layers == ["1"]
    folded = fold(model, stats, data, planner="all")
    assert folded.fold_report.rectifier_layers_removed == 0
    torch.testing.assert_close(folded(data), model(data))


def test_method_defaults_and_overrides_of_the_entropy_options():
    assert PruneConfig(method="easier").entropy_options() == dict(
        zero_as="on", aggregate="mean", estimator="batch_mean", saturation=False)
    assert PruneConfig(method="egp").entropy_options()["saturation"] is False
    assert PruneConfig().entropy_options()["saturation"] is True
    assert PruneConfig(method="easier", saturation=True).entropy_options()["saturation"] is True


# --------------------------------------------------------------------------------------------------
# Which iteration is returned
# --------------------------------------------------------------------------------------------------


def record(iteration, accuracy, collapsed, within=True):
    from nepenthe import IterationRecord

    return IterationRecord(iteration, accuracy, 0.0, {}, {}, [], {}, [], within, 0.0, collapsed=collapsed)


def test_select_depth_prefers_more_collapsed_layers_then_accuracy_then_earlier():
    from nepenthe.loop import select_iteration

    records = [record(0, 90.0, 0), record(1, 89.8, 2), record(2, 89.5, 5), record(3, 89.7, 5), record(4, 89.7, 5),
               record(5, 89.9, 6, within=False)]
    assert select_iteration(records, "depth") == 3  # 5 layers; 89.7 beats 89.5; 3 before 4
    assert select_iteration(records, "last") == 4
    # nothing collapsed anywhere: the most sparse iteration within tolerance, as "last"
    flat = [record(0, 90.0, 0), record(1, 89.9, 0), record(2, 89.95, 0), record(3, 80.0, 0, within=False)]
    assert select_iteration(flat, "depth") == select_iteration(flat, "last") == 2
    with pytest.raises(ValueError, match="select"):
        PruneConfig(select="best")
