"""Tests for nepenthe.prune: the iterative loop of SPEC §3, its checkpoints and its baselines.

Everything runs on a tiny ResidualMLP (width 8, 2 blocks: 3 rectifier layers) over a small slice
of the digits data, with a deterministic one-epoch retrain, so that two runs with the same seeds
give bit-identical models. Where the stop rule is under test, ``evaluate`` returns scripted
accuracies.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn

from nepenthe import PruneConfig, PruneError, measure, prune
from nepenthe.data import load_dataset, make_loader
from nepenthe.entropy import EntropyOptions
from nepenthe.masks import get_mask, get_masks, restore_masks
from nepenthe.models import ResidualMLP
from nepenthe.train import TrainConfig, evaluate, train

SITES = {"stem_relu", "blocks.0.relu", "blocks.1.relu"}
PRODUCERS = {"stem", "blocks.0.fc1", "blocks.1.fc1"}


@pytest.fixture(scope="module")
def data():
    splits = load_dataset("digits", limit=96)
    return {"train": splits.train, "val": make_loader(splits.val, 96), "calib": make_loader(splits.train, 48)}


def make_model(seed: int = 0) -> ResidualMLP:
    torch.manual_seed(seed)
    return ResidualMLP(64, 10, width=8, hidden=8, depth=2)


def make_retrain(data, calls: list[int] | None = None, crash_at: int | None = None):
    """One epoch of SGD, seeded by the iteration: the same iteration always trains the same way."""

    def retrain(model: nn.Module, iteration: int) -> None:
        if calls is not None:
            calls.append(iteration)
        if iteration == crash_at:
            raise RuntimeError("simulated crash during retraining")
        torch.manual_seed(1000 + iteration)
        train(model, make_loader(data["train"], 32, shuffle=True, seed=iteration), TrainConfig(epochs=1, lr=0.05))

    return retrain


class Scripted:
    """An ``evaluate`` that returns the given accuracies in order (dense first)."""

    def __init__(self, *accuracies: float):
        self.accuracies = list(accuracies)
        self.calls = 0

    def __call__(self, model: nn.Module) -> float:
        self.calls += 1
        return self.accuracies.pop(0)


class Snapshots:
    """A callback keeping each iteration's state_dict and masks as the loop saw them."""

    def __init__(self):
        self.states: dict[int, dict] = {}
        self.masks: dict[int, dict] = {}
        self.modules: dict[int, list[type]] = {}

    def __call__(self, record, model: nn.Module) -> None:
        self.states[record.iteration] = copy.deepcopy(model.state_dict())
        self.masks[record.iteration] = {k: v.clone() for k, v in get_masks(model).items()}
        self.modules[record.iteration] = [type(m) for m in model.modules()]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def records_without_time(result) -> list[dict]:
    return [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in result.iterations]


def run(data, model=None, *, evaluate_fn=None, callbacks=(), calls=None, crash_at=None, **config):
    model = model if model is not None else make_model()
    evaluate_fn = evaluate_fn or (lambda m: evaluate(m, data["val"]))
    return prune(model, data["calib"], retrain=make_retrain(data, calls, crash_at), evaluate=evaluate_fn,
                 config=PruneConfig(**config), callbacks=callbacks)


# --------------------------------------------------------------------------------------------------
# What each iteration records
# --------------------------------------------------------------------------------------------------


def test_records_per_iteration_and_masks_only_grow(data):
    model = make_model()
    snaps = Snapshots()
    calls: list[int] = []
    result = run(data, model, callbacks=[snaps], calls=calls, max_iters=3, delta=None)
    its = result.iterations
    assert [r.iteration for r in its] == [0, 1, 2, 3] and calls == [1, 2, 3]
    assert result.stop_reason == "reached max_iters=3" and result.selected == 3
    assert all(0.0 <= r.accuracy <= 100.0 and r.within_tolerance for r in its)
    assert result.dense_accuracy == its[0].accuracy
    sparsities = [r.sparsity for r in its]
    assert sparsities[0] == 0.0 and all(a < b for a, b in zip(sparsities, sparsities[1:]))
    for r in its:
        assert set(r.layer_entropy) == SITES
        assert set(r.layer_sparsity) == PRODUCERS  # the prunable set L: layers feeding a rectifier
        assert r.zero_entropy_layers == [k for k, v in r.layer_entropy.items() if v == 0.0]
        assert r.linearized == []
    assert its[0].pruned == {}
    # masks only grow, and pruned counts are exactly the newly masked weights
    for i in (1, 2, 3):
        before, after = snaps.masks[i - 1], snaps.masks[i]
        assert set(after) <= PRODUCERS
        for name, mask in after.items():
            old = before.get(name, torch.ones_like(mask))
            assert not bool((mask & ~old).any()), f"{name}: a pruned weight came back at iteration {i}"
            assert int(old.sum() - mask.sum()) == its[i].pruned[name]
            weight = snaps.states[i][f"{name}.weight"]
            assert bool((weight[~mask] == 0).all()), "retraining must keep masked weights at zero"
    # the model is left as the selected (last) iteration
    assert_same_state(model.state_dict(), snaps.states[3])
    assert result.stats.layer_entropy == its[3].layer_entropy


def test_max_iters_zero_only_measures_the_dense_model(data):
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    calls: list[int] = []
    result = run(data, model, calls=calls, max_iters=0)
    assert [r.iteration for r in result.iterations] == [0] and calls == [] and result.selected == 0
    assert_same_state(model.state_dict(), before)


# --------------------------------------------------------------------------------------------------
# Stop rules
# --------------------------------------------------------------------------------------------------


def test_stop_by_delta_restores_last_iteration_within_tolerance(data):
    model = make_model()
    snaps = Snapshots()
    scripted = Scripted(90.0, 89.5, 89.0, 88.9, 95.0)  # tolerance 90 - 1 = 89: iteration 3 falls below
    result = run(data, model, evaluate_fn=scripted, callbacks=[snaps], max_iters=9, delta=1.0, max_backoffs=0,
                 select="last")
    assert scripted.calls == 4
    assert [r.within_tolerance for r in result.iterations] == [True, True, True, False]
    assert result.selected == 2 and result.selected_record.accuracy == 89.0
    assert "fell below" in result.stop_reason
    assert_same_state(model.state_dict(), snaps.states[2])
    assert not torch.equal(snaps.states[3]["stem.weight_mask"], snaps.states[2]["stem.weight_mask"])
    assert result.stats.layer_entropy == result.iterations[2].layer_entropy


def test_stop_when_first_iteration_fails_restores_dense(data):
    model = make_model()
    dense = copy.deepcopy(model.state_dict())
    result = run(data, model, evaluate_fn=Scripted(90.0, 10.0), max_iters=5, delta=1.0, max_backoffs=0)
    assert result.selected == 0 and len(result.iterations) == 2
    assert_same_state(model.state_dict(), dense)  # no mask buffers left behind either
    assert get_masks(model) == {}


def test_stop_when_every_layer_is_emptied(data):
    # ζ = 1 and no cap on the stem: the first round empties every prunable layer; the second finds
    # nothing to prune
    calls: list[int] = []
    result = run(data, calls=calls, zeta=1.0, max_iters=5, delta=None, cut_max_sparsity=None)
    assert calls == [1] and [r.sparsity for r in result.iterations] == [0.0, 1.0]
    assert result.stop_reason.startswith("nothing left to prune") and result.selected == 1


def test_stop_when_every_rectifier_already_has_zero_entropy(data):
    model = make_model()
    with torch.no_grad():
        for name in PRODUCERS:  # constant inputs to every rectifier: all neurons always ON
            layer = model.get_submodule(name)
            layer.weight.zero_()
            layer.bias.fill_(1.0)
    calls: list[int] = []
    result = run(data, model, calls=calls, max_iters=5, delta=None)
    assert calls == [] and len(result.iterations) == 1
    assert set(result.iterations[0].zero_entropy_layers) == SITES
    assert result.stop_reason.startswith("nothing left to prune")


# --------------------------------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    directory = tmp_path_factory.mktemp("uninterrupted")
    model = make_model()
    result = run(data, model, max_iters=3, delta=None, checkpoint_dir=str(directory))
    return directory, result, copy.deepcopy(model.state_dict())


def test_checkpoint_files_and_summary(uninterrupted):
    directory, result, _ = uninterrupted
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["iter_000.pt", "iter_001.pt", "iter_002.pt", "iter_003.pt", "summary.json"]
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["selected"] == 3 and summary["stop_reason"] == result.stop_reason
    assert [r["sparsity"] for r in summary["iterations"]] == [r.sparsity for r in result.iterations]
    ckpt = torch.load(directory / "iter_002.pt", weights_only=True)  # plain tensors and containers only
    assert ckpt["record"]["iteration"] == 2 and ckpt["identity"] == PruneConfig().identity()
    assert "stem.weight_mask" in ckpt["model"]


@pytest.mark.parametrize("crash_at", [1, 2])
@pytest.mark.parametrize("same_model", [True, False], ids=["same-model", "fresh-model"])
def test_resume_after_crash_equals_uninterrupted_run(data, tmp_path, uninterrupted, crash_at, same_model):
    _, reference, reference_state = uninterrupted
    model = make_model()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(data, model, crash_at=crash_at, max_iters=3, delta=None, checkpoint_dir=str(tmp_path))
    assert sorted(p.name for p in tmp_path.glob("iter_*.pt")) == [f"iter_{i:03d}.pt" for i in range(crash_at)]
    if not same_model:  # a new process: a freshly built model, differently initialised
        model = make_model(seed=123)
    calls: list[int] = []
    result = run(data, model, calls=calls, max_iters=3, delta=None, checkpoint_dir=str(tmp_path))
    assert calls == list(range(crash_at, 4))  # continues at the interrupted iteration
    assert records_without_time(result) == records_without_time(reference)
    assert result.selected == reference.selected and result.stop_reason == reference.stop_reason
    assert_same_state(model.state_dict(), reference_state)


def test_resume_after_stop_by_delta_returns_the_selected_iteration(data, tmp_path):
    snaps = Snapshots()
    first = run(data, evaluate_fn=Scripted(90.0, 89.5, 50.0), callbacks=[snaps], max_iters=5, delta=1.0,
                checkpoint_dir=str(tmp_path), max_backoffs=0)
    assert first.selected == 1
    model = make_model(seed=7)
    calls: list[int] = []
    again = run(data, model, evaluate_fn=Scripted(), calls=calls, max_iters=5, delta=1.0, checkpoint_dir=str(tmp_path),
                max_backoffs=0)
    # the reason the first run stopped, kept in its checkpoint (not a generic "(resumed)")
    assert calls == [] and again.selected == 1 and again.stop_reason == first.stop_reason
    assert_same_state(model.state_dict(), snaps.states[1])


def test_resume_with_other_settings_is_refused(data, uninterrupted, tmp_path):
    directory, _, _ = uninterrupted
    copy_dir = tmp_path / "ckpt"
    copy_dir.mkdir()
    for p in directory.glob("iter_*.pt"):
        (copy_dir / p.name).write_bytes(p.read_bytes())
    for changed in (dict(zeta=0.25), dict(method="egp"), dict(zero_as="on")):
        with pytest.raises(PruneError, match="was written with"):
            run(data, max_iters=3, delta=None, checkpoint_dir=str(copy_dir), **changed)
    # resume=False starts over and overwrites
    result = run(data, max_iters=1, delta=None, checkpoint_dir=str(copy_dir), zeta=0.25, resume=False)
    assert len(result.iterations) == 2


def test_damaged_checkpoint_falls_back_to_the_previous_one(data, uninterrupted, tmp_path):
    """A damaged latest checkpoint (truncated, or a flipped weight the checksum catches) is named in a
    warning and the run resumes from the one before; a damaged dense checkpoint is an error; the
    temporary files of killed writes are removed."""
    directory, _, _ = uninterrupted
    for p in directory.glob("iter_00[012].pt"):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "iter_002.pt").write_bytes(b"not a checkpoint at all")
    ckpt = torch.load(tmp_path / "iter_001.pt", weights_only=True)
    key = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][key].view(-1)[0] += 1.0  # one flipped weight, the old checksum kept
    torch.save(ckpt, tmp_path / "iter_001.pt")
    stale = tmp_path / ".iter_003.pt.abc123.tmp"
    stale.write_bytes(b"half a write")
    damaged = r"iter_001\.pt cannot be used \(damaged: its checksum.*resuming from iteration 0"
    with pytest.warns(RuntimeWarning, match=damaged):
        result = run(data, max_iters=2, delta=None, checkpoint_dir=str(tmp_path))
    assert [r.iteration for r in result.iterations] == [0, 1, 2] and not stale.exists()
    (tmp_path / "iter_000.pt").write_bytes(b"garbage")
    with pytest.raises(PruneError, match=r"iter_000\.pt cannot be used \(unreadable"):
        run(data, max_iters=2, delta=None, checkpoint_dir=str(tmp_path))


# --------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------


def test_imp_prunes_every_layer_globally_including_the_classifier(data):
    model = make_model()
    result = run(data, model, method="imp", max_iters=1, delta=None)
    record = result.iterations[1]
    every = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(record.layer_sparsity) == every and "head" in every and "blocks.0.fc2" in every
    total = sum(model.get_submodule(n).weight.numel() for n in every)
    assert record.sparsity == math.floor(0.5 * total) / total
    assert get_mask(model.head) is not None and record.layer_sparsity["head"] > 0.0
    assert len({round(v, 6) for v in record.layer_sparsity.values()}) > 1  # one global threshold, uneven shares


def test_egp_measures_with_its_own_entropy_options(data):
    model = make_model()
    dense = copy.deepcopy(model)
    result = run(data, model, method="egp", max_iters=1, delta=None)
    assert result.stats.options == EntropyOptions(zero_as="off", aggregate="mixed_mean", estimator="batch_mean",
                                                  saturation=False)
    expected = measure(dense, data["calib"], zero_as="off", aggregate="mixed_mean", estimator="batch_mean",
                       saturation=False)
    assert result.iterations[0].layer_entropy == expected.layer_entropy
    assert result.iterations[1].sparsity > 0.0


def test_easier_replaces_one_activation_per_iteration_without_masking(data):
    model = make_model()
    result = run(data, model, method="easier", max_iters=2, delta=None)
    linearized = [r.linearized for r in result.iterations]
    assert linearized[0] == [] and all(len(x) == 1 for x in linearized[1:])
    assert len({x[0] for x in linearized[1:]}) == 2
    identities = [n for n, m in model.named_modules() if isinstance(m, nn.Identity)]
    assert sorted(identities) == sorted(x[0] for x in linearized[1:])
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 1
    assert get_masks(model) == {} and all(r.sparsity == 0.0 for r in result.iterations)
    # the lowest-entropy activation goes first
    first = result.iterations[0].layer_entropy
    assert linearized[1][0] == min(first, key=lambda k: (first[k], k))


def test_easier_stops_once_every_activation_is_replaced(data):
    model = make_model()
    result = run(data, model, method="easier", max_iters=6, delta=None)
    assert len(result.iterations) == 4 and result.stop_reason.startswith("nothing left")
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert result.iterations[-1].layer_entropy == {}


def test_easier_rollback_puts_the_activation_back(data):
    model = make_model()
    snaps = Snapshots()
    result = run(data, model, method="easier", evaluate_fn=Scripted(90.0, 90.0, 50.0), callbacks=[snaps],
                 max_iters=5, delta=1.0, max_backoffs=0)
    assert result.selected == 1
    assert [type(m) for m in model.modules()] == snaps.modules[1]
    assert sum(isinstance(m, nn.Identity) for m in model.modules()) == 1
    assert_same_state(model.state_dict(), snaps.states[1])


def test_model_without_rectifier_is_refused(data):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(PruneError, match="no prunable layer"):
        prune(model, data["calib"], retrain=lambda m, i: None, evaluate=lambda m: 0.0)


# --------------------------------------------------------------------------------------------------
# The pruned model's state_dict
# --------------------------------------------------------------------------------------------------


def test_masks_survive_a_state_dict_round_trip(data):
    model = make_model()
    run(data, model, max_iters=2, delta=None)
    state = model.state_dict()
    assert {k for k in state if k.endswith("weight_mask")} == {f"{n}.weight_mask" for n in PRODUCERS}
    fresh = make_model(seed=5)
    restore_masks(fresh, state)
    fresh.load_state_dict(state, strict=True)
    x = data["train"].tensors[0][:16]
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert get_masks(fresh).keys() == get_masks(model).keys()
    assert all(torch.equal(get_masks(fresh)[k], v) for k, v in get_masks(model).items())
    # and the reloaded masks are enforced by further training
    train(fresh, make_loader(data["train"], 32), TrainConfig(epochs=1, lr=0.05))
    for name, mask in get_masks(fresh).items():
        assert bool((fresh.get_submodule(name).weight[~mask] == 0).all())


def test_resume_false_clears_files_of_an_earlier_run(data, tmp_path):
    for name in ("iter_000.pt", "iter_007.pt"):
        (tmp_path / name).write_bytes(b"not a checkpoint of this run")
    (tmp_path / "summary.json").write_text("{}")
    result = run(data, max_iters=1, delta=None, checkpoint_dir=str(tmp_path), resume=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["iter_000.pt", "iter_001.pt", "summary.json"]
    assert torch.load(tmp_path / "iter_000.pt", weights_only=True)["record"]["iteration"] == 0
    assert json.loads((tmp_path / "summary.json").read_text())["selected"] == result.selected
