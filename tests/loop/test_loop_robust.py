"""Steps that cannot destroy the model: back-off on a failed step (accuracy past δ, diverged
retraining), caps on layers whose emptying would cut the network, per-layer caps, protected
layers, and the budget's fan-in normalisation — on the tiny ResidualMLP of test_loop."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from nepenthe import PruneConfig, prune
from nepenthe.budget import magnitude_mask
from nepenthe.masks import get_mask, get_masks
from nepenthe.train import TrainConfig, train
from tests.loop.test_loop import (
    Scripted,
    Snapshots,
    assert_same_state,
    data,
    make_model,
    make_retrain,
    records_without_time,
    run,
)

__all__ = ["data"]  # the shared fixture

PRODUCERS = {"stem", "blocks.0.fc1", "blocks.1.fc1"}


def masks_of(model):
    return {k: v.clone() for k, v in get_masks(model).items()}


# --------------------------------------------------------------------------------------------------
# Back-off
# --------------------------------------------------------------------------------------------------


def test_failed_step_is_retried_with_half_the_amount(data):
    model = make_model()
    snaps = Snapshots()
    # dense 90; iteration 1: 10 (fails), then 89.5 (kept); iterations 2, 3: 89.2, 89.1
    result = run(data, model, evaluate_fn=Scripted(90.0, 10.0, 89.5, 89.2, 89.1), callbacks=[snaps], max_iters=3,
                 delta=1.0, max_backoffs=3)
    first = result.iterations[1]
    assert first.within_tolerance and first.zeta == 0.25 and len(first.backoffs) == 1
    assert first.backoffs[0]["zeta"] == 0.5 and first.backoffs[0]["accuracy"] == 10.0
    assert "fell below" in first.backoffs[0]["failure"]
    assert result.iterations[2].zeta == 0.25  # the smaller step carries over to the next iteration
    assert result.iterations[3].zeta == 0.5  # which passed at once: the step grows back one notch
    assert result.backoffs == 1 and result.selected == 3
    # the retry thinned every layer's share of the failed step by half, starting from the dense
    # weights: its masks are the dense weights' magnitude masks with those counts
    failed = first.backoffs[0]["pruned"]
    assert first.pruned == {n: math.floor(k * 0.5) for n, k in failed.items()}
    assert sum(failed.values()) > sum(first.pruned.values()) > 0
    for name, mask in snaps.masks[1].items():
        dense_weight = snaps.states[0][f"{name}.weight"]
        assert torch.equal(mask, magnitude_mask(dense_weight, None, first.pruned[name])), name


def test_back_offs_are_bounded_and_the_last_good_model_is_returned(data):
    model = make_model()
    dense = copy.deepcopy(model.state_dict())
    calls: list[int] = []
    result = run(data, model, evaluate_fn=Scripted(90.0, 10.0, 11.0, 12.0, 13.0), calls=calls, max_iters=4,
                 delta=1.0, max_backoffs=3)
    assert calls == [1, 1, 1, 1]  # the first try and three retries of iteration 1
    assert len(result.iterations) == 2 and result.selected == 0
    failed = result.iterations[1]
    assert not failed.within_tolerance and failed.accuracy == 13.0 and failed.zeta == 0.5 / 8
    assert [b["zeta"] for b in failed.backoffs] == [0.5, 0.25, 0.125]
    assert "after 3 back-off(s)" in result.stop_reason and "fell below" in result.stop_reason
    assert_same_state(model.state_dict(), dense) and get_masks(model) == {}


@pytest.mark.parametrize("how", ["raise", "nan-weights", "built-in-trainer"])
def test_diverged_retraining_is_a_failed_step_not_a_crash(data, how):
    model = make_model()
    normal = make_retrain(data)
    tries: list[int] = []

    def retrain(m: nn.Module, iteration: int) -> None:
        tries.append(iteration)
        if len(tries) == 1:  # the first attempt diverges
            if how == "raise":
                raise FloatingPointError("training loss became nan")
            if how == "nan-weights":
                with torch.no_grad():
                    m.blocks[0].fc2.weight.fill_(float("nan"))
                return
            train(m, torch.utils.data.DataLoader(data["train"], 32), TrainConfig(epochs=1, lr=1e30))
        normal(m, iteration)

    result = prune(model, data["calib"], retrain=retrain, evaluate=Scripted(90.0, 89.9), config=PruneConfig(
        max_iters=1, delta=1.0, max_backoffs=2))
    record = result.iterations[1]
    assert tries == [1, 1] and record.within_tolerance and len(record.backoffs) == 1
    assert record.backoffs[0]["accuracy"] is None
    assert ("NaN/Inf in blocks.0.fc2.weight" if how == "nan-weights" else "diverged") in record.backoffs[0]["failure"]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_divergence_on_every_attempt_stops_with_the_reason(data):
    def retrain(m, iteration):
        raise FloatingPointError("training loss became inf")

    model = make_model()
    dense = copy.deepcopy(model.state_dict())
    result = prune(model, data["calib"], retrain=retrain, evaluate=Scripted(90.0),
                   config=PruneConfig(max_iters=3, delta=1.0, max_backoffs=1))
    assert len(result.iterations) == 2 and result.selected == 0
    last = result.iterations[1]
    assert last.accuracy is None and last.layer_entropy == {} and "diverged" in last.failure
    assert "diverged" in result.stop_reason
    assert_same_state(model.state_dict(), dense)


def test_easier_back_off_tries_the_next_lowest_entropy_activation(data):
    model = make_model()
    result = run(data, model, method="easier", evaluate_fn=Scripted(90.0, 10.0, 89.5), max_iters=1, delta=1.0,
                 max_backoffs=2)
    dense_entropy = result.iterations[0].layer_entropy
    order = sorted(dense_entropy, key=lambda k: (dense_entropy[k], k))
    record = result.iterations[1]
    assert record.backoffs[0]["linearized"][0] == order[0]
    assert record.linearized[0] == order[1] and record.within_tolerance
    replaced = {n for n, m in model.named_modules() if isinstance(m, nn.Identity)}
    assert order[0] not in replaced and order[1] in replaced


def test_resume_after_a_backed_off_iteration_is_identical(data, tmp_path):
    def accuracies():
        return Scripted(90.0, 10.0, 89.5, 89.4, 89.3)

    reference = run(data, evaluate_fn=accuracies(), max_iters=3, delta=1.0, max_backoffs=2)
    model = make_model()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(data, model, evaluate_fn=accuracies(), crash_at=2, max_iters=3, delta=1.0, max_backoffs=2,
            checkpoint_dir=str(tmp_path))
    script = accuracies()
    script.accuracies = script.accuracies[3:]  # dense and iteration 1 (two attempts) were evaluated before the crash
    resumed = run(data, make_model(seed=9), evaluate_fn=script, max_iters=3, delta=1.0, max_backoffs=2,
                  checkpoint_dir=str(tmp_path))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "backoffs"} | {"backoffs": [  # noqa: E731
        {k: v for k, v in b.items() if k != "seconds"} for b in r["backoffs"]]} for r in rs]
    assert strip(records_without_time(resumed)) == strip(records_without_time(reference))
    assert resumed.iterations[2].zeta == 0.25


# --------------------------------------------------------------------------------------------------
# Caps
# --------------------------------------------------------------------------------------------------


def test_a_layer_whose_emptying_cuts_the_network_is_capped(data):
    # ζ = 1 would empty every prunable layer; the stem is the only path from the input, so it keeps
    # 1 % of its weights, while the residual branches (a skip carries the input past them) empty
    model = make_model()
    result = run(data, model, zeta=1.0, max_iters=1, delta=None)
    record = result.iterations[1]
    stem_numel = model.stem.weight.numel()
    kept = math.ceil(0.01 * stem_numel)
    assert record.capped == {"stem": kept}
    assert int(get_mask(model.stem).sum()) == kept
    assert record.layer_sparsity["blocks.0.fc1"] == 1.0 and record.layer_sparsity["blocks.1.fc1"] == 1.0
    # the cut check is off with cut_max_sparsity=None: everything is emptied
    result = run(data, zeta=1.0, max_iters=1, delta=None, cut_max_sparsity=None)
    assert result.iterations[1].capped == {} and result.iterations[1].sparsity == 1.0


def test_cut_cap_applies_to_imp_too(data):
    model = make_model()
    result = run(data, model, method="imp", zeta=1.0, max_iters=1, delta=None)
    capped = result.iterations[1].capped
    assert set(capped) == {"stem", "head"}  # the two layers every input-output path goes through
    assert all(int(get_mask(model.get_submodule(n)).sum()) == k for n, k in capped.items())
    assert result.iterations[1].layer_sparsity["blocks.1.fc2"] == 1.0


def test_layer_caps_by_glob(data):
    model = make_model()
    result = run(data, model, zeta=0.9, max_iters=3, delta=None, layer_caps={"blocks.*": 0.6})
    for record in result.iterations[1:]:
        for name in ("blocks.0.fc1", "blocks.1.fc1"):
            assert record.layer_sparsity[name] <= 0.6 + 1e-9
    assert any("blocks.0.fc1" in r.capped for r in result.iterations[1:])
    with pytest.raises(ValueError, match="layer_caps"):
        PruneConfig(layer_caps={"stem": 1.5})


@pytest.mark.parametrize("protect, expected", [
    (("first",), PRODUCERS - {"stem"}),
    (("blocks.0.*",), PRODUCERS - {"blocks.0.fc1"}),
    ("stem", PRODUCERS - {"stem"}),
])
def test_protected_layers_are_never_pruned(data, protect, expected):
    model = make_model()
    result = run(data, model, max_iters=2, delta=None, protect=protect)
    assert set(result.iterations[-1].layer_sparsity) == expected
    assert set(get_masks(model)) <= expected


def test_protect_last_for_imp_keeps_the_classifier_dense(data):
    model = make_model()
    result = run(data, model, method="imp", max_iters=1, delta=None, protect=("last",))
    assert "head" not in result.iterations[1].layer_sparsity and get_mask(model.head) is None


def test_normalize_fan_in_changes_the_allocation(data):
    plain = run(data, max_iters=1, delta=None, zeta=0.5, normalize="none")
    fair = run(data, max_iters=1, delta=None, zeta=0.5)  # the default
    # the 64-input stem has the smallest weights: without normalisation it loses a larger share
    assert plain.iterations[1].layer_sparsity["stem"] > fair.iterations[1].layer_sparsity["stem"]
    with pytest.raises(ValueError, match="normalize"):
        PruneConfig(normalize="fan_out")


def test_new_settings_are_part_of_the_checkpoint_identity(data, tmp_path):
    from nepenthe import PruneError

    run(data, max_iters=1, delta=None, checkpoint_dir=str(tmp_path))
    for changed in (dict(normalize="none"), dict(protect=("first",)), dict(layer_caps={"stem": 0.5}),
                    dict(cut_max_sparsity=None), dict(max_backoffs=0), dict(saturation=False)):
        with pytest.raises(PruneError, match="was written with"):
            run(data, max_iters=1, delta=None, checkpoint_dir=str(tmp_path), **changed)


def test_invalid_robustness_settings_are_refused():
    for bad in (dict(max_backoffs=-1), dict(backoff_factor=1.0), dict(backoff_factor=0.0),
                dict(cut_max_sparsity=1.0)):
        with pytest.raises(ValueError):
            PruneConfig(**bad)


def test_masks_of_a_restored_snapshot_are_not_shared(data):
    """After a back-off the model's masks must be its own: a later load_state_dict (which copies
    into buffers) must not rewrite the snapshot kept for the next back-off."""
    model = make_model()
    result = run(data, model, evaluate_fn=Scripted(90.0, 10.0, 89.5, 10.0, 89.4), max_iters=2, delta=1.0,
                 max_backoffs=2)
    assert [len(r.backoffs) for r in result.iterations] == [0, 1, 1]
    before = masks_of(model)
    model.load_state_dict({k: (torch.zeros_like(v) if k.endswith("_mask") else v)
                           for k, v in model.state_dict().items()})
    assert any(not torch.equal(before[k], get_masks(model)[k]) for k in before)


def test_entropy_budget_prunes_a_cut_layer_no_faster_than_the_step_rate(data):
    # without normalisation the 64-input stem has the smallest weights and would take most of the
    # budget; as a cut layer it loses at most ζ = 0.4 of its remaining weights per step
    model = make_model()
    result = run(data, model, zeta=0.4, max_iters=2, delta=None, select="last", normalize="none")
    first, second = result.iterations[1], result.iterations[2]
    numel = model.stem.weight.numel()
    assert first.pruned["stem"] == math.floor(0.4 * numel) and "stem" in first.capped
    assert second.pruned["stem"] <= math.floor(0.4 * (numel - first.pruned["stem"]))
    # IMP's global threshold has no such limit (only the emptying cap)
    imp = run(data, make_model(), method="imp", zeta=0.4, max_iters=1, delta=None)
    assert imp.iterations[1].pruned["stem"] > math.floor(0.4 * numel)


def test_backed_off_entropy_step_thins_a_layer_the_full_step_empties(data):
    # ζ = 1 empties both residual branches; the retry at half scale prunes half of each instead
    model = make_model()
    result = run(data, model, evaluate_fn=Scripted(90.0, 10.0, 89.5), zeta=1.0, max_iters=1, delta=1.0,
                 max_backoffs=1, select="last")
    record = result.iterations[1]
    failed = record.backoffs[0]["pruned"]
    numel = model.blocks[0].fc1.weight.numel()
    assert failed["blocks.0.fc1"] == numel and record.pruned["blocks.0.fc1"] == numel // 2
    assert record.layer_sparsity["blocks.0.fc1"] == 0.5
