"""Tests for nepenthe.masks: mask buffers on the model, persistence, and masks surviving optimizer steps."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn

from nepenthe.loop.masked_training import enforce_masks, keep_masks_after_steps
from nepenthe.masks import (
    get_mask,
    get_masks,
    mask_buffer_name,
    masked_modules,
    prunable_modules,
    remaining_weights,
    remove_masks,
    restore_masks,
    set_mask,
    sparsity,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.body = nn.Sequential(nn.Linear(4 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.relu(self.body(x.flatten(1))))


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def random_mask(shape, keep: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < keep


def mask_net(net: Net) -> dict[str, torch.Tensor]:
    masks = {
        "conv": random_mask(net.conv.weight.shape, 0.5, 1),
        "body.0": random_mask(net.body[0].weight.shape, 0.3, 2),
        "fc": random_mask(net.fc.weight.shape, 0.6, 3),
    }
    modules = dict(net.named_modules())
    for name, m in masks.items():
        set_mask(modules[name], m)
    return masks


# --------------------------------------------------------------------------------------------------
# set_mask / get_mask / state_dict
# --------------------------------------------------------------------------------------------------


def test_set_mask_zeroes_weights_and_registers_buffer():
    net = make_net()
    before = net.body[0].weight.detach().clone()
    mask = random_mask(before.shape, 0.4, 7)
    set_mask(net.body[0], mask)
    w = net.body[0].weight.detach()
    assert (w[~mask] == 0).all()
    assert torch.equal(w[mask], before[mask])
    assert isinstance(net.body[0].weight, nn.Parameter)  # not renamed or replaced
    assert torch.equal(get_mask(net.body[0]), mask)
    assert get_mask(net.body[0]).dtype == torch.bool
    assert get_mask(net.fc) is None
    assert mask_buffer_name() == "weight_mask"
    assert mask_buffer_name("bias") == "bias_mask"
    assert not net.body[0]._forward_hooks and not net.body[0]._forward_pre_hooks  # no hooks added


def test_state_dict_contains_mask_keys():
    net = make_net()
    mask_net(net)
    sd = net.state_dict()
    for name in ("conv", "body.0", "fc"):
        assert f"{name}.weight_mask" in sd
        assert sd[f"{name}.weight_mask"].dtype == torch.bool
        assert f"{name}.weight" in sd  # original key kept
    assert "body.2.weight_mask" not in sd
    # nothing else is added or renamed
    plain = make_net().state_dict()
    assert set(sd) - set(plain) == {"conv.weight_mask", "body.0.weight_mask", "fc.weight_mask"}
    assert set(plain) <= set(sd)


def test_set_mask_replaces_and_converts():
    net = make_net()
    set_mask(net.fc, torch.ones(3, 8))  # float mask -> bool
    assert get_mask(net.fc).dtype == torch.bool and get_mask(net.fc).all()
    new = torch.zeros(3, 8, dtype=torch.bool)
    new[0] = True
    set_mask(net.fc, new)
    assert torch.equal(get_mask(net.fc), new)
    assert (net.fc.weight[1:] == 0).all()
    assert list(net.fc._buffers) == ["weight_mask"]


def test_set_mask_shape_error():
    net = make_net()
    with pytest.raises(ValueError, match=r"does not fit weight.*Linear"):
        set_mask(net.fc, torch.ones(8, 3, dtype=torch.bool))


def test_set_mask_channels_last_and_other_param():
    net = make_net().to(memory_format=torch.channels_last)
    mask = random_mask(net.conv.weight.shape, 0.5, 4)
    set_mask(net.conv, mask)
    assert (net.conv.weight[~mask] == 0).all() and (net.conv.weight[mask] != 0).all()
    bias_mask = torch.tensor([True, False, True, False])
    set_mask(net.conv, bias_mask, "bias")
    assert net.conv.bias[1] == 0 and net.conv.bias[3] == 0
    assert "conv.bias_mask" in net.state_dict()


def test_masks_survive_dtype_and_forward():
    net = make_net()
    mask_net(net)
    net.double()
    assert get_mask(net.fc).dtype == torch.bool
    net.float()
    out = net(torch.randn(2, 2, 4, 4))
    assert out.shape == (2, 3)


def test_masked_modules_and_get_masks():
    net = make_net()
    masks = mask_net(net)
    assert list(masked_modules(net)) == ["conv", "body.0", "fc"]
    got = get_masks(net)
    assert set(got) == set(masks)
    for k in masks:
        assert torch.equal(got[k], masks[k])


# --------------------------------------------------------------------------------------------------
# restore_masks + load_state_dict
# --------------------------------------------------------------------------------------------------


def test_round_trip_into_fresh_model():
    net = make_net(0)
    masks = mask_net(net)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)

    fresh = make_net(1)
    with pytest.raises(RuntimeError, match="weight_mask"):
        fresh.load_state_dict(sd, strict=True)  # no mask buffers yet
    assert restore_masks(fresh, sd) is fresh
    fresh.load_state_dict(sd, strict=True)
    for name, m in masks.items():
        module = dict(fresh.named_modules())[name]
        assert torch.equal(get_mask(module), m)
        assert (module.weight[~m] == 0).all()
    for (k, v), (k2, v2) in zip(net.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    net.eval()
    fresh.eval()
    x = torch.randn(3, 2, 4, 4)
    assert torch.equal(net(x), fresh(x))


def test_restore_masks_missing_parameter():
    net = make_net()
    with pytest.raises(KeyError, match=r"nope\.weight_mask.*no parameter nope\.weight"):
        restore_masks(net, {"nope.weight_mask": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(KeyError, match="fc.gamma"):
        restore_masks(net, {"fc.gamma_mask": torch.ones(3, 8, dtype=torch.bool)})
    with pytest.raises(KeyError, match="body.1"):  # ReLU has no weight
        restore_masks(net, {"body.1.weight_mask": torch.ones(1, dtype=torch.bool)})
    assert not masked_modules(net)


def test_restore_masks_ignores_other_keys():
    net = make_net()
    restore_masks(net, {"fc.weight": torch.zeros(3, 8), "conv.bias": torch.zeros(4)})
    assert not masked_modules(net)
    assert (net.fc.weight != 0).any()


def test_remove_masks_keeps_zeros():
    net = make_net()
    masks = mask_net(net)
    remove_masks(net)
    assert not masked_modules(net)
    assert "fc.weight_mask" not in net.state_dict()
    assert (net.fc.weight[~masks["fc"]] == 0).all()
    net.load_state_dict(make_net().state_dict(), strict=True)  # plain architecture again


# --------------------------------------------------------------------------------------------------
# masks through optimizer steps
# --------------------------------------------------------------------------------------------------


def _train(net, opt, steps: int, check):
    g = torch.Generator().manual_seed(123)
    for _ in range(steps):
        x = torch.randn(8, 2, 4, 4, generator=g)
        y = torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        check()


def _assert_masked_zero(net, masks, opt, keys):
    modules = dict(net.named_modules())
    for name, m in masks.items():
        p = modules[name].weight
        assert (p.detach()[~m] == 0).all(), name
        for key in keys:
            buf = opt.state[p][key]
            assert (buf[~m] == 0).all(), (name, key)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_weight_decay_keeps_masked_weights_and_momentum_zero(foreach, nesterov):
    net = make_net()
    masks = mask_net(net)
    initial = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=1e-2,
                          foreach=foreach)
    handle = keep_masks_after_steps(opt, net)
    _train(net, opt, 5, lambda: _assert_masked_zero(net, masks, opt, ["momentum_buffer"]))
    modules = dict(net.named_modules())
    for name, m in masks.items():
        w = modules[name].weight.detach()
        changed = w[m] != initial[f"{name}.weight"][m]
        assert changed.float().mean() > 0.9, name  # unmasked weights do train
        assert (opt.state[modules[name].weight]["momentum_buffer"][m] != 0).any()
    assert not torch.equal(net.body[2].weight, initial["body.2.weight"])  # unmasked layer trains
    # the gradient itself is not masked: without the hook, masked weights would move
    handle.remove()
    _train(net, opt, 1, lambda: None)
    assert (net.fc.weight.detach()[~masks["fc"]] != 0).any()


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_keeps_masked_weights_and_moments_zero(amsgrad, foreach):
    net = make_net()
    masks = mask_net(net)
    initial = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, foreach=foreach)
    keep_masks_after_steps(opt, net)
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    _train(net, opt, 5, lambda: _assert_masked_zero(net, masks, opt, keys))
    modules = dict(net.named_modules())
    for name, m in masks.items():
        p = modules[name].weight
        assert (p.detach()[m] != initial[f"{name}.weight"][m]).float().mean() > 0.9, name
        assert (opt.state[p]["exp_avg_sq"][m] > 0).any()


def test_enforce_masks_without_optimizer():
    net = make_net()
    masks = mask_net(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    enforce_masks(net)
    assert (net.fc.weight[~masks["fc"]] == 0).all()
    assert (net.fc.weight[masks["fc"]] != 0).all()
    enforce_masks(net, torch.optim.SGD(net.parameters(), lr=0.1))  # no state yet: fine


# --------------------------------------------------------------------------------------------------
# prunable modules, sparsity and counts
# --------------------------------------------------------------------------------------------------


def test_prunable_modules_and_filter():
    net = make_net()
    assert list(prunable_modules(net)) == ["conv", "body.0", "body.2", "fc"]
    no_fc = prunable_modules(net, lambda m, name: name != "fc")
    assert list(no_fc) == ["conv", "body.0", "body.2"]
    assert list(prunable_modules(net, types=(nn.Conv2d,))) == ["conv"]


def test_sparsity_numbers():
    net = make_net()
    # conv: 4*2*3*3 = 72 weights, mask 18 of them; fc: 24 weights, mask 6; body.0 (1024) and body.2 (128) unmasked
    conv_mask = torch.ones(72, dtype=torch.bool)
    conv_mask[:18] = False
    set_mask(net.conv, conv_mask.reshape(4, 2, 3, 3))
    fc_mask = torch.ones(3, 8, dtype=torch.bool)
    fc_mask[0, :6] = False
    set_mask(net.fc, fc_mask)
    overall, per_layer = sparsity(prunable_modules(net))
    assert per_layer == {"conv": 0.25, "body.0": 0.0, "body.2": 0.0, "fc": 0.25}
    assert overall == pytest.approx((18 + 6) / (72 + 1024 + 128 + 24))
    overall, per_layer = sparsity({"conv": net.conv, "fc": net.fc})
    assert overall == pytest.approx(24 / 96)
    assert sparsity({}) == (0.0, {})
    assert remaining_weights(net.conv) == 54
    assert remaining_weights(net.fc) == 18
    assert remaining_weights(net.body[0]) == 1024
    # a fully masked layer
    set_mask(net.body[2], torch.zeros(8, 16, dtype=torch.bool))
    assert sparsity({"b": net.body[2]})[1]["b"] == 1.0
    assert remaining_weights(net.body[2]) == 0


def test_bias_masks_are_enforced_and_removed_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    bias_mask = torch.tensor([True, False, True, False])
    set_mask(model[0], bias_mask, "bias")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    handle = keep_masks_after_steps(opt, model)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).sum().backward()
        opt.step()
    handle.remove()
    assert torch.all(model[0].bias[~bias_mask] == 0)
    assert torch.all(opt.state[model[0].bias]["momentum_buffer"][~bias_mask] == 0)
    remove_masks(model)
    assert "bias_mask" not in dict(model[0].named_buffers())
