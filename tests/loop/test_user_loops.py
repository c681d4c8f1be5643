"""The user's own habits: a plain torch.optim loop (weight decay, momentum) as ``retrain`` cannot
undo pruning, an update that bypasses optimizers is caught and undone with a warning, and an
``evaluate`` that returns a fraction is read as one."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nepenthe import PruneConfig, ops, prune
from nepenthe.data import load_dataset, make_loader
from nepenthe.loop import masks_enforced, repair_masked_weights
from nepenthe.masks import masked_parameters, set_mask
from nepenthe.train import evaluate
from tests.loop.test_loop import make_model


@pytest.fixture(scope="module")
def data():
    splits = load_dataset("digits", limit=96)
    return {"train": splits.train, "val": make_loader(splits.val, 96), "calib": make_loader(splits.train, 48)}


def plain_adamw_retrain(data, weight_decay=0.1, data_writes=False):
    """A user's loop: torch.optim.AdamW with weight decay (which pulls every weight, masked or not)."""
    def retrain(model: nn.Module, iteration: int) -> None:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=weight_decay)
        torch.manual_seed(iteration)
        for x, y in data["calib"]:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        if data_writes:
            with torch.no_grad():
                for p in model.parameters():
                    p.data.add_(0.01)  # bypasses every optimizer hook
    return retrain


def real_masked_fraction(model: nn.Module) -> tuple[int, int]:
    """(masked entries that are exactly zero, masked entries)."""
    zero = total = 0
    for module, name, mask in masked_parameters(model):
        held = getattr(module, name).detach()[~mask]
        zero, total = zero + int((held == 0).sum()), total + held.numel()
    return zero, total


def test_plain_adamw_cannot_undo_the_masks(data):
    checks = []

    def check(record, model):
        checks.append((record.iteration, record.sparsity, real_masked_fraction(model)))

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no repair needed: the step hook kept the masks
        result = prune(make_model(), data["calib"], retrain=plain_adamw_retrain(data),
                       evaluate=lambda m: evaluate(m, data["val"]), config=PruneConfig(max_iters=3, delta=None),
                       callbacks=[check])
    assert len(result.iterations) > 1 and result.iterations[-1].sparsity > 0
    for iteration, _, (zero, total) in checks:
        assert zero == total, f"iteration {iteration}: {total - zero} masked weights revived"


def test_updates_that_bypass_the_optimizer_are_undone_with_a_warning(data):
    revived = r"iteration 1: retrain left \d+ masked weights non-zero .* set back to zero"
    with pytest.warns(RuntimeWarning, match=revived):
        prune(make_model(), data["calib"], retrain=plain_adamw_retrain(data, data_writes=True),
              evaluate=lambda m: evaluate(m, data["val"]),
              config=PruneConfig(max_iters=1, delta=None), callbacks=[
                  lambda record, model: None if record.iteration == 0 else
                  _assert_all_masked_zero(model)])


def _assert_all_masked_zero(model):
    zero, total = real_masked_fraction(model)
    assert total > 0 and zero == total


def test_masks_enforced_around_any_optimizer_and_the_fused_fast_path():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    mask = torch.rand(8, 6, generator=torch.Generator().manual_seed(0)) > 0.5
    set_mask(model[0], mask)
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    for opt in (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1),
                torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5),
                ops.MaskedSGD(model.parameters(), lr=0.1, momentum=0.9)):  # no masks given: the hook keeps them
        with masks_enforced(model):
            for _ in range(3):
                opt.zero_grad()
                F.mse_loss(model(x), y).backward()
                opt.step()
        assert bool((model[0].weight[~mask] == 0).all())
        state = opt.state[model[0].weight]
        for buf in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            if buf in state:
                assert bool((state[buf][~mask] == 0).all()), buf
    # outside the block nothing is enforced any more: the hook is gone
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    opt.step()
    assert bool((model[0].weight[~mask] != 0).all())
    assert repair_masked_weights(model) == {"0.weight": int((~mask).sum())}
    assert bool((model[0].weight[~mask] == 0).all()) and repair_masked_weights(model) == {}


def test_an_evaluate_returning_a_fraction_is_read_as_one(data):
    fraction = lambda m: evaluate(m, data["val"]) / 100  # noqa: E731  (the torchmetrics habit)
    with pytest.warns(UserWarning, match=r"evaluate returned 0\.\d+ for the dense model: read as a fraction"):
        as_fraction = prune(make_model(), data["calib"], retrain=lambda m, i: None, evaluate=fraction,
                            config=PruneConfig(max_iters=1, delta=None))
    as_percent = prune(make_model(), data["calib"], retrain=lambda m, i: None,
                       evaluate=lambda m: evaluate(m, data["val"]), config=PruneConfig(max_iters=1, delta=None))
    for a, b in zip(as_fraction.iterations, as_percent.iterations):
        assert a.accuracy == pytest.approx(b.accuracy)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # an explicit scale: no guess, no warning
        explicit = prune(make_model(), data["calib"], retrain=lambda m, i: None, evaluate=fraction,
                         config=PruneConfig(max_iters=0, metric_scale=1))
    assert explicit.iterations[0].accuracy == pytest.approx(as_percent.iterations[0].accuracy / 100)
    with pytest.raises(ValueError, match="metric_scale must be a positive number"):
        PruneConfig(metric_scale=0)


def test_prune_step_is_one_step_without_the_loop(data):
    from nepenthe import prune_step
    from nepenthe.masks import get_masks

    model = make_model()
    step = prune_step(model, data["calib"], config=PruneConfig(zeta=0.5))
    masks = get_masks(model)
    assert step.pruned and sum(step.pruned.values()) == sum(int((~m).sum()) for m in masks.values()) > 0
    assert all(bool((model.get_submodule(n).weight[~m] == 0).all()) for n, m in masks.items())
    again = prune_step(model, data["calib"], config=PruneConfig(zeta=0.5), scale=0.5)  # masks only grow
    assert all(bool((get_masks(model)[n] <= m).all()) for n, m in masks.items()) and sum(again.pruned.values()) > 0
    with pytest.raises(ValueError, match="scale must be in"):
        prune_step(model, data["calib"], scale=0)
