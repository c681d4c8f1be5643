"""Bit-packed mask storage on the model (``<param>_mask_bits``, 1 bit per weight) end to end: storage and
what reads it, state_dict / restore_masks round trips, hostile buffers refused naming the layer, the fused
optimizers reading the bits bit-identically to bool masks, the enforcement helpers, interop, folding, and
the pruning loop's checkpoints and resume with ``PruneConfig(pack_masks=True)`` giving the same run."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn

from nepenthe import PruneConfig, ops, prune
from nepenthe.data import load_dataset, make_loader
from nepenthe.loop import enforce_masks, masked_optimizer, masks_enforced, repair_masked_weights
from nepenthe.mask_interop import adopt_torch_prune, export_torch_prune
from nepenthe.masks import (
    get_mask,
    get_masks,
    mask_lookup,
    masked_modules,
    masked_parameters,
    pack_masks_,
    remaining_weights,
    remove_masks,
    restore_masks,
    set_mask,
    sparsity,
    stored_mask,
    unpack_masks_,
)
from nepenthe.models import ResidualMLP
from nepenthe.train import TrainConfig, evaluate, train


def make_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 7), nn.ReLU(),
                         nn.Linear(7, 3))


def masked_pair(seed: int = 0):
    """The same network with the same random masks, stored as bool in one and packed in the other."""
    plain, packed = make_net(seed), make_net(seed)
    g = torch.Generator().manual_seed(seed + 1)
    for i in (0, 3, 5):
        keep = torch.rand(plain[i].weight.shape, generator=g) > 0.45
        set_mask(plain[i], keep)
        set_mask(packed[i], keep, packed=True)
    set_mask(plain[3], torch.rand(7, generator=g) > 0.5, "bias")  # any parameter, not only weights
    set_mask(packed[3], get_mask(plain[3], "bias"), "bias", packed=True)
    return plain, packed


# ----- storage -------------------------------------------------------------------------------------------
def test_packed_storage_is_one_bit_per_weight_and_reads_as_bool():
    plain, packed = masked_pair()
    assert list(packed[0]._buffers) == ["weight_mask_bits"] and list(plain[0]._buffers) == ["weight_mask"]
    bits = packed[3].weight_mask_bits
    assert bits.dtype == torch.uint8 and bits.shape == ((7 * 80 + 7) // 8,)
    stored = sum(b.numel() * b.element_size() for _, _, b in masked_parameters(packed))
    weights = sum(getattr(m, n).numel() for m, n, _ in masked_parameters(packed))
    assert stored / weights <= 0.125 + 3 / weights  # at most one byte of padding per parameter
    for i in (0, 3, 5):
        assert get_mask(packed[i]).dtype == torch.bool and torch.equal(get_mask(packed[i]), get_mask(plain[i]))
        assert torch.equal(packed[i].weight, plain[i].weight)  # masked weights zeroed the same way
        assert remaining_weights(packed[i]) == remaining_weights(plain[i])
    assert masked_modules(packed).keys() == masked_modules(plain).keys() == {"0", "3", "5"}
    assert all(torch.equal(a, b) for a, b in zip(get_masks(packed).values(), get_masks(plain).values()))
    assert sparsity(masked_modules(packed)) == sparsity(masked_modules(plain))
    assert [(n, m.dtype) for _, n, m in masked_parameters(packed)] == [
        ("weight", torch.uint8), ("weight", torch.uint8), ("bias", torch.uint8), ("weight", torch.uint8)]


def test_the_form_is_kept_on_replacement_and_converted_on_request():
    _, packed = masked_pair()
    fewer = get_mask(packed[3]) & (torch.arange(560).view(7, 80) % 2 == 0)
    set_mask(packed[3], fewer)  # packed=None: stays packed
    assert stored_mask(packed[3]).dtype == torch.uint8 and torch.equal(get_mask(packed[3]), fewer)
    set_mask(packed[3], fewer, packed=False)  # one form at a time: the bits are dropped
    assert list(packed[3]._buffers) == ["bias_mask_bits", "weight_mask"]
    unpack_masks_(packed)
    assert all(m.dtype == torch.bool for _, _, m in masked_parameters(packed))
    before = {k: v.clone() for k, v in get_masks(packed).items()}
    pack_masks_(packed)
    assert all(m.dtype == torch.uint8 for _, _, m in masked_parameters(packed))
    assert all(torch.equal(before[k], v) for k, v in get_masks(packed).items())
    remove_masks(packed)
    assert masked_parameters(packed) == [] and not any(k.endswith("_bits") for k in packed.state_dict())


def test_padding_bits_are_ignored():
    lin = nn.Linear(3, 3)  # 9 weights: 7 padding bits in the second byte
    keep = torch.rand(3, 3) > 0.5
    set_mask(lin, keep, packed=True)
    lin.weight_mask_bits[-1] |= 0b11111110
    assert torch.equal(get_mask(lin), keep) and remaining_weights(lin) == int(keep.sum())


# ----- state_dict, restore, hostile input ----------------------------------------------------------------
def test_state_dict_round_trip_into_a_fresh_model():
    _, packed = masked_pair()
    sd = packed.state_dict()
    assert {k for k in sd if "mask" in k} == {"0.weight_mask_bits", "3.weight_mask_bits", "3.bias_mask_bits",
                                              "5.weight_mask_bits"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = make_net(seed=7)
    restore_masks(fresh, loaded)
    fresh.load_state_dict(loaded)
    for k, v in sd.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert stored_mask(fresh[0]).dtype == torch.uint8
    again = copy.deepcopy(fresh)  # the load check survives copies
    again.load_state_dict(sd)


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(3, dtype=torch.uint8), r"must be a dense uint8\[17\] tensor.*got torch.uint8\[3\]"),
    (torch.zeros(17, dtype=torch.float32), r"got torch.float32\[17\]"),
    (torch.zeros(17, dtype=torch.bool), r"got torch.bool\[17\]"),
    (torch.zeros(1, 17, dtype=torch.uint8), r"got torch.uint8\[1, 17\]"),
    ([0] * 17, r"got list"),
])
def test_restore_refuses_a_packed_mask_that_does_not_fit(bad, message):
    fresh = make_net()
    sd = {"0.weight_mask_bits": bad}  # conv 5x3x3x3 = 135 weights: 17 bytes
    with pytest.raises(ValueError, match=r"0\.weight_mask_bits: a packed mask of a parameter of shape "
                                         r"\(5, 3, 3, 3\) \(135 elements\)"):
        restore_masks(fresh, sd)
    with pytest.raises(ValueError, match=message):
        restore_masks(fresh, sd)
    assert masked_parameters(fresh) == []


def test_load_state_dict_refuses_bad_packed_buffers_naming_the_key():
    _, packed = masked_pair()
    sd = packed.state_dict()
    with pytest.raises(RuntimeError, match=r"3\.weight_mask_bits: a packed mask must be uint8.*got torch.float32"):
        packed.load_state_dict({**sd, "3.weight_mask_bits": sd["3.weight_mask_bits"].float()})
    with pytest.raises(RuntimeError, match=r"size mismatch for 3\.weight_mask_bits"):
        packed.load_state_dict({**sd, "3.weight_mask_bits": torch.zeros(3, dtype=torch.uint8)})
    plain_sd = masked_pair()[0].state_dict()
    with pytest.raises(RuntimeError, match=r"0\.weight_mask is a bool mask but the model stores 0\.weight_mask_bits "
                                           r"packed: call nepenthe\.masks\.restore_masks"):
        packed.load_state_dict(plain_sd)
    with pytest.raises(ValueError, match="two masks of 0.weight"):
        restore_masks(make_net(), {"0.weight_mask": plain_sd["0.weight_mask"], "0.weight_mask_bits": sd[
            "0.weight_mask_bits"]})


# ----- optimizers and enforcement ------------------------------------------------------------------------
def _train_steps(model, name, steps=4, backend=None):
    opt = masked_optimizer(model, name, lr=0.05, **({"momentum": 0.9, "weight_decay": 1e-3} if name == "sgd" else {}))
    g = torch.Generator().manual_seed(3)
    with ops.use_backend(backend):
        for _ in range(steps):
            x = torch.randn(4, 3, 6, 6, generator=g)
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    return opt


@pytest.mark.parametrize("backend", [None, "torch"], ids=["auto", "torch"])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_masked_optimizers_read_packed_buffers_bit_identically(monkeypatch, name, backend):
    plain, packed = masked_pair()
    seen = []
    real = ops.masked_sgd_ if name == "sgd" else ops.masked_adamw_
    target = "nepenthe.ops.optim.masked_sgd_" if name == "sgd" else "nepenthe.ops.optim.masked_adamw_"

    def spy(*args, **kwargs):
        seen.append([m.data_ptr() for m in args[3 if name == "sgd" else 5] if m is not None])
        return real(*args, **kwargs)
    monkeypatch.setattr(target, spy)
    _train_steps(packed, name, backend=backend)
    monkeypatch.undo()
    opt = _train_steps(plain, name, backend=backend)
    # the buffers themselves reach the step: no unpacked (or re-packed) copy per step
    assert set(seen[-1]) == {m.data_ptr() for _, _, m in masked_parameters(packed)}
    for (ka, a), (kb, b) in zip(plain.state_dict().items(), packed.state_dict().items()):
        if "mask" not in ka:
            assert ka == kb and torch.equal(a, b), ka
    for m, n, _ in masked_parameters(packed):
        assert not bool(getattr(m, n)[~get_mask(m, n)].any())
    assert opt.state  # the state exists (and is zero where masked, checked by the ops tests)


def test_enforcement_helpers_take_packed_masks():
    plain, packed = masked_pair()
    for net in (plain, packed):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)  # revive every masked weight
    assert repair_masked_weights(packed) == repair_masked_weights(plain) != {}
    for net in (plain, packed):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
        enforce_masks(net)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), packed.parameters()))
    for net in (plain, packed):
        opt = torch.optim.AdamW(net.parameters(), lr=0.1)
        with masks_enforced(net):
            net(torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))).sum().backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), packed.parameters()))
    p = packed[3].weight.detach().clone()
    ops.apply_mask_(p, stored_mask(packed[3]))
    assert torch.equal(p, packed[3].weight)


def test_mask_lookup_hands_over_the_stored_form():
    _, packed = masked_pair()
    lookup = mask_lookup(packed)
    assert lookup(packed[3].weight) is packed[3].weight_mask_bits and lookup(packed[0].bias) is None


def test_export_to_torch_prune_and_back():
    plain, packed = masked_pair()
    keep = get_mask(packed[3]).clone()
    export_torch_prune(packed)
    assert torch.equal(packed[3].weight_mask, keep.float()) and not any(k.endswith("_bits")
                                                                         for k, _ in packed.named_buffers())
    adopt_torch_prune(packed)
    assert torch.equal(get_mask(packed[3]), keep)


def test_fold_with_packed_masks_drops_them():
    from nepenthe import measure
    from nepenthe.fold import fold
    _, packed = masked_pair()
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    packed.eval()
    folded = fold(packed, measure(packed, [x]), x)
    assert not any("mask" in k for k in folded.state_dict())
    torch.testing.assert_close(folded(x), packed(x), rtol=1e-5, atol=1e-5)


# ----- the pruning loop ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data():
    splits = load_dataset("digits", limit=96)
    return {"train": splits.train, "val": make_loader(splits.val, 96), "calib": make_loader(splits.train, 48)}


def _model(seed=0):
    torch.manual_seed(seed)
    return ResidualMLP(64, 10, width=8, hidden=8, depth=2)


def _run(data, model, crash_at=None, **config):
    def retrain(m, iteration):
        if iteration == crash_at:
            raise RuntimeError("simulated crash during retraining")
        torch.manual_seed(1000 + iteration)
        train(m, make_loader(data["train"], 32, shuffle=True, seed=iteration), TrainConfig(epochs=1, lr=0.05))
    return prune(model, data["calib"], retrain=retrain, evaluate=lambda m: evaluate(m, data["val"]),
                 config=PruneConfig(max_iters=3, delta=None, **config))


def _records(result):
    return [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in result.iterations]


def _weights_and_masks(model):
    return ({k: v for k, v in model.state_dict().items() if "mask" not in k},
            {k: v.clone() for k, v in get_masks(model).items()})


def test_loop_with_packed_masks_checkpoints_and_resumes_like_bool_masks(data, tmp_path):
    bool_model = _model()
    reference = _run(data, bool_model, checkpoint_dir=str(tmp_path / "bool"))
    want_weights, want_masks = _weights_and_masks(bool_model)
    assert want_masks and reference.selected > 0

    model = _model()
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(data, model, crash_at=2, checkpoint_dir=str(tmp_path / "packed"), pack_masks=True)
    ckpt = torch.load(tmp_path / "packed" / "iter_001.pt", weights_only=True)["model"]
    assert "stem.weight_mask_bits" in ckpt and not any(k.endswith("_mask") for k in ckpt)
    fresh = _model(seed=123)  # a new process: a freshly built model
    result = _run(data, fresh, checkpoint_dir=str(tmp_path / "packed"), pack_masks=True)
    assert _records(result) == _records(reference) and result.selected == reference.selected
    weights, masks = _weights_and_masks(fresh)
    assert all(m.dtype == torch.uint8 for _, _, m in masked_parameters(fresh))
    assert weights.keys() == want_weights.keys() and all(torch.equal(weights[k], want_weights[k]) for k in weights)
    assert masks.keys() == want_masks.keys() and all(torch.equal(masks[k], want_masks[k]) for k in masks)

    # bool checkpoints resumed with packing on (and the reverse) give the same run too
    again = _model(seed=5)
    mixed = _run(data, again, checkpoint_dir=str(tmp_path / "bool"), pack_masks=True)
    assert _records(mixed) == _records(reference)
    assert all(m.dtype == torch.uint8 for _, _, m in masked_parameters(again))
