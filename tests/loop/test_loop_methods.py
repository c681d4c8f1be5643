"""Pruning methods as objects (nepenthe.loop.methods): the built-in names and objects are the same
method, and a user's own method runs through the whole loop (back-off, checkpoints, records)."""

from __future__ import annotations

import pytest
import torch

import nepenthe
from nepenthe import PruneConfig, PruningMethod, prune_
from nepenthe.data import load_dataset, make_loader
from nepenthe.loop import IMP, METHODS, Nepenthe, get_method
from nepenthe.masks import get_masks, remaining_weights
from nepenthe.models import ResidualMLP
from nepenthe.train import TrainConfig, evaluate, train


@pytest.fixture(scope="module")
def data():
    splits = load_dataset("digits", limit=96)
    return {"train": splits.train, "val": make_loader(splits.val, 96), "calib": make_loader(splits.train, 48)}


def make_model() -> ResidualMLP:
    torch.manual_seed(0)
    return ResidualMLP(64, 10, width=8, hidden=8, depth=2)


def run(data, config: PruneConfig, model=None):
    model = model if model is not None else make_model()

    def retrain(m, iteration):
        torch.manual_seed(1000 + iteration)
        train(m, make_loader(data["train"], 32, shuffle=True, seed=iteration), TrainConfig(epochs=1, lr=0.05))
    result = prune_(model, data["calib"], retrain=retrain, evaluate=lambda m: evaluate(m, data["val"]), config=config)
    return model, result


class HalveEach(PruningMethod):
    """Every prunable layer loses half of its remaining weights (times the back-off scale)."""

    name = "halve"

    def __init__(self):
        self.calls = []

    def step(self, pruner, stats, scale, avoid):
        self.calls.append(scale)
        counts = {n: int(0.5 * scale * remaining_weights(m)) for n, m in pruner.layers.items()}
        return pruner.prune_by_magnitude(counts)


def test_names_and_objects_are_the_same_method(data):
    assert set(METHODS) == {"nepenthe", "imp", "egp", "easier"}
    assert isinstance(get_method("nepenthe"), Nepenthe) and get_method(IMP).name == "imp"
    by_name, _ = run(data, PruneConfig(method="imp", max_iters=2, delta=None))
    by_object, _ = run(data, PruneConfig(method=IMP(), max_iters=2, delta=None))
    for (k, a), (_, b) in zip(sorted(get_masks(by_name).items()), sorted(get_masks(by_object).items()), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="nepenthe.*PruningMethod"):
        PruneConfig(method="magnitude")


def test_a_users_method_runs_through_the_loop(data, tmp_path):
    method = HalveEach()
    model, result = run(data, PruneConfig(method=method, max_iters=3, delta=None, checkpoint_dir=str(tmp_path)))
    assert len(method.calls) == 3 and all(s == 1.0 for s in method.calls)
    pruned = [r.pruned for r in result.iterations[1:]]
    assert all(sum(p.values()) > 0 for p in pruned)
    # each step halves what remains: the sparsity of every layer approaches 1 - 1/8
    assert result.iterations[3].sparsity == pytest.approx(1 - 0.5 ** 3, abs=0.05)
    assert torch.load(tmp_path / "iter_001.pt", weights_only=True)["identity"]["method"] == "halve"


def test_a_users_method_is_backed_off_with_a_smaller_scale(data):
    method = HalveEach()
    accuracies = iter([90.0, 10.0, 89.5])  # dense, the full step fails, the halved one passes

    model = make_model()
    result = nepenthe.prune(model, data["calib"], retrain=lambda m, it: None, evaluate=lambda m: next(accuracies),
                            config=PruneConfig(method=method, max_iters=1, delta=1.0))
    assert method.calls == [1.0, 0.5]
    assert len(result.iterations[1].backoffs) == 1 and result.iterations[1].within_tolerance


def test_prune_is_prune_():
    assert nepenthe.prune is nepenthe.prune_
