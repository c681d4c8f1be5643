"""Bounded memory with bit-packed masks: a pruning step (every method), the loop around it (back-off,
restore, enforcement, records) and its snapshots never hold more than one layer's unpacked mask at a
time, and a snapshot keeps no more than the loop needs."""

from __future__ import annotations

import sys
import weakref

import pytest
import torch
import torch.nn as nn

import nepenthe.masks as masks_module
from nepenthe import PruneConfig, prune, prune_step
from nepenthe.data import load_dataset, make_loader
from nepenthe.masks import get_masks, masked_parameters, set_mask
from nepenthe.train import TrainConfig, evaluate, train


class Stack(nn.Module):
    """Linear+ReLU layers of different sizes (the largest is not the most numerous), a Linear head."""

    def __init__(self, widths=(64, 24, 24, 24, 24, 24), classes=10):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.acts = nn.ModuleList(nn.ReLU() for _ in widths[1:])
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x):
        x = x.flatten(1)
        for layer, act in zip(self.layers, self.acts):
            x = act(layer(x))
        return self.head(x)


def make_stack(seed=0, masked=0.5):
    torch.manual_seed(seed)
    model = Stack()
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.Linear) and masked:
            set_mask(m, torch.rand(m.weight.shape, generator=g) >= masked, packed=True)
    return model


class UnpackTracker:
    """Counts the elements of the unpacked masks (``nepenthe.masks.unpack_mask``'s results) alive at
    once, wherever the function was imported to: its peak is what a step held unpacked together."""

    def __init__(self, monkeypatch):
        self.alive: list[tuple[weakref.ref, int]] = []
        self.peak = self.calls = 0
        original = masks_module.unpack_mask

        def tracked(packed, shape):
            out = original(packed, shape)
            self.alive = [(r, n) for r, n in self.alive if r() is not None] + [(weakref.ref(out), out.numel())]
            self.calls += 1
            self.peak = max(self.peak, sum(n for _, n in self.alive))
            return out

        for name, module in list(sys.modules.items()):
            if name.startswith("nepenthe") and getattr(module, "unpack_mask", None) is original:
                monkeypatch.setattr(module, "unpack_mask", tracked)


def largest_layer(model):
    return max(getattr(m, p).numel() for m, p, _ in masked_parameters(model))


@pytest.fixture(scope="module")
def data():
    splits = load_dataset("digits", limit=96)
    return {"train": splits.train, "val": make_loader(splits.val, 96), "calib": make_loader(splits.train, 48)}


@pytest.mark.parametrize("method", ["imp", "nepenthe", "egp"])
def test_a_step_with_packed_masks_unpacks_one_layer_at_a_time(data, monkeypatch, method):
    model, bools = make_stack(), make_stack()
    for m in bools.modules():  # the same masks as bool: the reference the packed step must equal
        if isinstance(m, nn.Linear):
            masks_module.unpack_masks_(m)
    config = PruneConfig(method=method, zeta=0.3, pack_masks=True)
    want = prune_step(bools, data["calib"], config=PruneConfig(method=method, zeta=0.3))
    tracker = UnpackTracker(monkeypatch)
    got = prune_step(model, data["calib"], config=config)
    total = sum(getattr(m, p).numel() for m, p, _ in masked_parameters(model))
    assert tracker.calls > 0 and 0 < tracker.peak <= largest_layer(model) < total / 2
    assert got.pruned == want.pruned and sum(got.pruned.values()) > 0
    assert all(m.dtype == torch.uint8 for _, _, m in masked_parameters(model))
    assert get_masks(model).keys() == get_masks(bools).keys()
    assert all(torch.equal(a, get_masks(bools)[k]) for k, a in get_masks(model).items())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), bools.parameters()))


def test_the_loop_with_packed_masks_unpacks_one_layer_at_a_time(data, monkeypatch):
    """Steps, a back-off (restore), retraining under enforcement, repair, records, snapshots."""
    def retrain(m, iteration):
        torch.manual_seed(iteration)
        train(m, make_loader(data["train"], 32, shuffle=True, seed=iteration), TrainConfig(epochs=1, lr=0.05))

    for method in ("imp", "nepenthe"):
        model, accuracies = make_stack(), iter([90.0, 10.0, 89.5, 89.4, 89.3])
        tracker = UnpackTracker(monkeypatch)
        result = prune(model, data["calib"], retrain=retrain, evaluate=lambda m, a=accuracies: next(a, 89.0),
                       config=PruneConfig(method=method, zeta=0.3, max_iters=2, delta=1.0, pack_masks=True))
        assert [len(r.backoffs) for r in result.iterations][:2] == [0, 1]
        assert tracker.calls > 0 and tracker.peak <= largest_layer(model)
    assert evaluate(model, data["val"]) >= 0


# ----- the budget reads packed masks as they are ---------------------------------------------------------
@pytest.mark.parametrize("chunk", [16, 1 << 20])
def test_budget_functions_take_packed_masks_bit_identically(monkeypatch, chunk):
    from nepenthe import budget
    from nepenthe.masks import pack_mask

    monkeypatch.setattr(budget, "_CHUNK", chunk)  # slices that split layers (a multiple of 8)
    g = torch.Generator().manual_seed(3)
    shapes = {"a": (7, 13), "b": (5, 3, 3), "c": (1,), "d": (64, 9)}
    weights = {n: torch.randn(s, generator=g).round(decimals=1) for n, s in shapes.items()}  # ties
    masks = {n: torch.rand(s, generator=g) > 0.4 for n, s in shapes.items()}
    masks["c"] = None
    packed = {n: None if m is None else pack_mask(m) for n, m in masks.items()}
    for fraction, limits in ((0.3, None), (0.7, {"d": 10}), (1.0, None)):
        want = budget.magnitude_threshold(weights, masks, fraction, limits)
        assert budget.magnitude_threshold(weights, packed, fraction, limits) == want
        for n, k in want.counts.items():
            assert torch.equal(budget.magnitude_mask(weights[n], packed[n], k),
                               budget.magnitude_mask(weights[n], masks[n], k))
    for n in shapes:
        assert budget.irrelevance(0.5, weights[n], packed[n]) == budget.irrelevance(0.5, weights[n], masks[n])
    with pytest.raises(ValueError, match=r"uint8\[12\]"):
        budget.magnitude_mask(weights["a"], packed["a"][:-1], 3)


# ----- snapshots ------------------------------------------------------------------------------------------
def bits(state):
    """Every tensor of a state_dict as its bytes (so -0.0, NaN payloads and dtypes count)."""
    return {k: (v.dtype, tuple(v.shape), v.detach().contiguous().reshape(-1).view(torch.uint8).clone())
            for k, v in state.items()}


def same_bits(a, b):
    return a.keys() == b.keys() and all(a[k][:2] == b[k][:2] and torch.equal(a[k][2], b[k][2]) for k in a)


@pytest.mark.parametrize("packed", [True, False])
def test_a_snapshot_holds_the_kept_weights_and_the_masks_as_stored(data, packed):
    from nepenthe.loop import enforce_masks
    from nepenthe.loop.pruner import Pruner
    from nepenthe.loop.snapshot import state_bytes

    model = make_stack(masked=0.75)
    if not packed:
        masks_module.unpack_masks_(model)
    enforce_masks(model)  # masked weights +0.0, as after any retraining under the loop
    pruner = Pruner(model, data["calib"], PruneConfig(method="imp", pack_masks=packed), {})
    before = bits(model.state_dict())
    whole = state_bytes(model.state_dict())
    snap = pruner.snapshot()
    masked = [(m, p) for m, p, _ in masked_parameters(model)]
    dropped = sum(getattr(m, p).numel() - masks_module.remaining_weights(m) for m, p in masked)
    assert len(snap.kept) == len(masked) and snap.nbytes == whole - 4 * dropped  # float32: 4 bytes a weight
    assert all(k.endswith("_mask_bits" if packed else "_mask") for k in snap.state if "mask" in k)
    assert snap.nbytes < 0.4 * whole if packed else snap.nbytes < 0.55 * whole

    prune_step(model, data["calib"], config=PruneConfig(method="imp", zeta=0.5, pack_masks=packed))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    pruner.restore(snap)
    assert same_bits(bits(model.state_dict()), before)
    pruner.restore(snap)  # a snapshot is restored as often as the back-offs need
    assert same_bits(bits(model.state_dict()), before)


def test_a_snapshot_keeps_negative_zeros_and_keeps_odd_layers_whole(data):
    """set_mask multiplies (a negative masked weight becomes -0.0): the snapshot restores the sign; a
    layer with anything else at a masked position (NaN, a revived weight) is kept whole."""
    from nepenthe.loop.pruner import Pruner

    model = make_stack(masked=0.5)  # -0.0 at about half of the masked positions
    first, second = model.layers[0], model.layers[1]
    keep = masks_module.get_mask(second)
    with torch.no_grad():
        second.weight[~keep] = torch.where(torch.arange(int((~keep).sum())) % 2 == 0, float("nan"), 0.25)
    assert bool(torch.signbit(first.weight[~masks_module.get_mask(first)]).any())
    pruner = Pruner(model, data["calib"], PruneConfig(method="imp", pack_masks=True), {})
    before = bits(model.state_dict())
    snap = pruner.snapshot()
    assert "layers.0.weight" in snap.kept and snap.kept["layers.0.weight"][1] is not None
    assert "layers.1.weight" in snap.state and "layers.1.weight" not in snap.kept
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(2.0)
    pruner.restore(snap)
    assert same_bits(bits(model.state_dict()), before)


def test_a_resume_holds_one_model_state_at_a_time(data, tmp_path):
    """Reading N checkpoints drops each one's model state once checked; the resume reads back the ones
    it needs (the last, the selected) and ends as the uninterrupted run. A file replaced in between is
    refused, not resumed from."""
    from nepenthe.errors import PruneError
    from nepenthe.loop.resume import load_checkpoints, model_state

    def retrain(m, iteration):
        torch.manual_seed(iteration)
        train(m, make_loader(data["train"], 32, shuffle=True, seed=iteration), TrainConfig(epochs=1, lr=0.05))

    def config(folder, max_iters=5):
        return PruneConfig(method="imp", zeta=0.3, max_iters=max_iters, delta=1.0, max_backoffs=0, pack_masks=True,
                           checkpoint_dir=str(folder), select="last")

    def run(model, folder, max_iters, scores):
        return prune(model, data["calib"], retrain=retrain, evaluate=lambda m: next(scores),
                     config=config(folder, max_iters))

    whole = make_stack()
    reference = run(whole, tmp_path / "whole", 5, iter([90.0, 89.9, 89.8, 80.0]))
    assert [r.within_tolerance for r in reference.iterations] == [True, True, True, False]
    found = load_checkpoints(tmp_path / "whole", config(tmp_path / "whole"))
    assert [c["model"] for c in found] == [None] * 4
    assert same_bits(bits(model_state(found[2])), bits(torch.load(found[2]["path"], weights_only=True)["model"]))
    found[1]["path"].write_bytes(found[0]["path"].read_bytes())  # another good checkpoint in its place
    with pytest.raises(PruneError, match="iter_001.pt changed while the run was resuming"):
        model_state(found[1])

    resumed = make_stack(seed=7)
    scores = iter([90.0, 89.9, 89.8, 80.0])  # one evaluation per iteration, over both runs
    run(make_stack(), tmp_path / "part", 2, scores)
    again = run(resumed, tmp_path / "part", 5, scores)  # resumes after iteration 2
    assert [r.accuracy for r in again.iterations] == [r.accuracy for r in reference.iterations]
    assert again.selected == reference.selected == 2
    assert same_bits(bits(resumed.state_dict()), bits(whole.state_dict()))


