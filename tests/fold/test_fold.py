"""End-to-end tests of nepenthe.fold (SPEC §4) and of saving / loading folded models.

Every model here has its neuron states FORCED by construction, so that exactness can be checked
on fresh inputs and not only on the calibration batch:

* inputs are uniform in [-1, 1], and each layer's output is bounded (|z_i| ≤ Σ|W_i|·bound_in + |b_i|),
* an always-ON row gets the bias Σ|W_i|·bound_in + margin, so z_i ≥ margin > 0 on every input
  (for conv + BN stacks, where such bounds are loose, the BN shift is placed from the observed
  range with a 25 % margin instead, see ``place_``),
* an always-OFF row has zero weights (masked: "pruned whole rows") and a negative bias,
* a row that is OFF but not constant (LeakyReLU) gets the bias −(Σ|W_i|·bound_in + margin),
* ReLU6 rows are saturated (z ≥ 6 + margin) or kept strictly inside (0, 6).

``check_fold`` then measures the model on a calibration batch with ``nepenthe.measure``, folds it,
confirms that a fresh batch from the same distribution keeps every constant neuron's state, and
compares the folded model with the original on that fresh batch: fp32 max|Δ| / max|ref| ≤ 1e-5.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nepenthe import FoldError, fold, measure
from nepenthe.fold import FoldReport, critical_path
from nepenthe.fold.modules import BorderCorrectedConv
from nepenthe.fold.preview import empty_layers
from nepenthe.masks import get_mask, set_mask
from nepenthe.models import MLP, ResidualMLP, SmallCNN

FP32_TOL = 1e-5
MARGIN = 0.25


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # default initialisations (heads, unforced layers) are the same in every run


# --------------------------------------------------------------------------------------------------
# Construction helpers
# --------------------------------------------------------------------------------------------------


def uniform(*shape: int, seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape
    return float((out - ref).abs().max() / ref.abs().max())


@torch.no_grad()
def force_rows_(m: nn.Module, states: list[str], in_bound: float, seed: int) -> float:
    """Set a Linear/Conv's rows so each output channel is in the given state for every input with
    |x| ≤ in_bound; returns a bound on |output|.

    States: "on" (z ≥ margin), "off" (row pruned by a mask, bias −1), "neg" (z ≤ −margin, weights
    kept), "sat" (z ≥ 6 + margin), "lin6" (z strictly inside (0, 6)), "free" (zero bias).
    """
    w = m.weight
    g = torch.Generator().manual_seed(seed)
    w.copy_(torch.randn(w.shape, generator=g) / w[0].numel() ** 0.5)
    if m.bias is None:
        m.bias = nn.Parameter(torch.zeros(w.shape[0]))
    bias = torch.zeros(w.shape[0])
    off_rows = torch.tensor([s == "off" for s in states])
    for i, state in enumerate(states):
        if state == "lin6":  # |W_i x| ≤ 2.5, bias 3: z in [0.5, 5.5]
            w[i] *= 2.5 / (float(w[i].abs().sum()) * in_bound)
    spread = w.abs().flatten(1).sum(1) * in_bound
    for i, state in enumerate(states):
        bias[i] = {"on": spread[i] + MARGIN, "neg": -(spread[i] + MARGIN), "sat": spread[i] + 6 + MARGIN,
                   "lin6": 3.0, "off": -1.0, "free": 0.0}[state]
    m.bias.copy_(bias)
    if off_rows.any():  # prune whole rows, the way the loop would: a mask, zeros in the weight
        mask = torch.ones(w.shape, dtype=torch.bool)
        mask[off_rows] = False
        set_mask(m, mask)
    spread[off_rows] = 0
    return float((bias.abs() + spread).max())


@torch.no_grad()
def random_conv_bn_(conv: nn.Conv2d, bn: nn.BatchNorm2d, off: list[int], seed: int) -> None:
    """Random conv weights (rows in ``off`` pruned by a mask), BN in eval with random running
    statistics and affine (negative gains too). ``place_`` then sets the BN shifts."""
    g = torch.Generator().manual_seed(seed)
    w = conv.weight
    c = w.shape[0]
    w.copy_(torch.randn(w.shape, generator=g) / w[0].numel() ** 0.5)
    bn.running_mean.copy_(torch.randn(c, generator=g))
    bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    bn.weight.copy_(torch.randn(c, generator=g))
    bn.bias.zero_()
    if off:
        mask = torch.ones(w.shape, dtype=torch.bool)
        mask[off] = False
        set_mask(conv, mask)


@torch.no_grad()
def place_(model: nn.Module, module: nn.Module, states: list[str], x: torch.Tensor, channel_dim: int = 1) -> None:
    """Shift ``module``'s bias per channel from its output on ``x`` (the rectifier's input):

    "on": minimum at margin + 25 % of the channel's range (ON with room to spare on fresh inputs),
    "free": median at 0 (ON on about half the samples: a genuinely mixed channel),
    "off": the channel is constant (pruned row) and is moved to −1.
    Unlike worst-case bounds this keeps offsets at the scale of the signal, so fp32 rounding stays
    comparable between the model and its folded copy (no large constants cancelling downstream).
    """
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(out))
    try:
        model(x)
    finally:
        handle.remove()
    out = seen[0].movedim(channel_dim, 0).flatten(1)
    lo, hi, mid = out.min(1).values, out.max(1).values, out.median(1).values
    for c, state in enumerate(states):
        if state == "on":
            module.bias[c] += MARGIN + 0.25 * (hi[c] - lo[c]) - lo[c]
        elif state == "free":
            module.bias[c] -= mid[c]
        else:
            assert state == "off" and float(hi[c] - lo[c]) == 0.0
            module.bias[c] -= hi[c] + 1


def assert_states_kept(model: nn.Module, calib_stats, fresh: torch.Tensor) -> None:
    """Every neuron constant on the calibration data is in the same state on ``fresh``."""
    fresh_stats = measure(model, [fresh])
    for name in calib_stats.histogram:
        for attr in ("always_off", "always_on", "always_saturated"):
            seen, now = getattr(calib_stats, attr)[name], getattr(fresh_stats, attr)[name]
            assert not bool((seen & ~now).any()), f"{name}: fresh inputs leave the {attr} state"


def check_fold(model: nn.Module, calib: torch.Tensor, fresh: torch.Tensor, **kwargs):
    """Measure, fold, and compare with the original on fresh inputs; returns (folded, stats)."""
    model.eval()
    stats = measure(model, [calib[: len(calib) // 2], calib[len(calib) // 2:]])
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exactness warning would be a failure here
        gm = fold(model, stats, calib, **{"planner": "all", **kwargs})  # deterministic merges
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()), "fold modified the model"
    assert_states_kept(model, stats, fresh)
    with torch.no_grad():
        ref, out = model(fresh), gm(fresh)
    assert rel_err(out, ref) <= FP32_TOL
    report = gm.fold_report
    assert isinstance(report, FoldReport) and report.max_rel_error <= FP32_TOL
    # the outputs genuinely depend on the input (the check is not dominated by constant biases)
    assert float(ref.std(0).max()) > 1e-3 * float(ref.abs().max())
    assert not any(name.endswith("_mask") for name, _ in gm.named_buffers())
    return gm, stats


def linear_modules(gm: nn.Module) -> list[nn.Module]:
    return [m for m in gm.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


class Chain(nn.Module):
    """fc_0 → act → fc_1 → act → … → head, with ONE activation module called at every layer."""

    def __init__(self, act: nn.Module, depth: int = 3, width: int = 8, in_features: int = 6):
        super().__init__()
        self.fcs = nn.ModuleList([nn.Linear(in_features if i == 0 else width, width) for i in range(depth)])
        self.act = act
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        for fc in self.fcs:
            x = self.act(fc(x))
        return self.head(x)


def forced_chain(act: nn.Module, states_per_layer: list[list[str]], seed: int = 0, cap: float | None = None) -> Chain:
    """A Chain whose layer i has the given row states; ``cap`` bounds the activation's output (6 for ReLU6)."""
    model = Chain(act, depth=len(states_per_layer))
    bound = 1.0
    for i, (fc, states) in enumerate(zip(model.fcs, states_per_layer, strict=True)):
        bound = force_rows_(fc, states, bound, seed + i)
        bound = bound if cap is None else min(bound, cap)
    return model.eval()


ON_OFF = ["on", "off", "on", "on", "off", "on", "on", "on"]


# --------------------------------------------------------------------------------------------------
# Exactness on forced models
# --------------------------------------------------------------------------------------------------


def test_plain_mlp_folds_to_one_linear():
    model = MLP(6, num_classes=3, width=8, depth=3).eval()
    hidden = [m for m in model.net if isinstance(m, nn.Linear)][:-1]
    bound = 1.0
    for i, lin in enumerate(hidden):
        bound = force_rows_(lin, ON_OFF if i != 1 else ["on"] * 7 + ["off"], bound, seed=i)
    gm, _ = check_fold(model, uniform(256, 6, seed=1), uniform(256, 6, seed=2))
    report = gm.fold_report
    assert report.rectifier_layers_total == 3 and report.rectifier_layers_removed == 3
    assert report.removed == ["net.2", "net.4", "net.6"]
    assert report.ops_merged == 3 and report.linear_ops_before == 4 and report.linear_ops_after == 1
    assert report.channels_removed == {"net.1": 2, "net.3": 1, "net.5": 2}
    assert report.skipped == [] and report.approximated == []
    assert [type(m) for m in linear_modules(gm)] == [nn.Linear]
    assert report.critical_path_before == 7 and report.critical_path_after == 1 == critical_path(gm)
    assert report.params_after < report.params_before
    assert report.params_after == sum(p.numel() for p in gm.parameters()) == 6 * 3 + 3


def test_merge_false_only_drops_activations_and_verify_false_skips_the_check():
    model = forced_chain(nn.ReLU(), [ON_OFF, ON_OFF])
    gm, _ = check_fold(model, uniform(256, 6, seed=1), uniform(256, 6, seed=2), planner="none")
    report = gm.fold_report
    assert report.rectifier_layers_removed == 2 and report.ops_merged == 0 and report.merges == []
    assert report.linear_ops_after == report.linear_ops_before == 3
    assert report.critical_path_after == 3 < report.critical_path_before
    unchecked = fold(model, measure(model, [uniform(64, 6, seed=1)]), uniform(4, 6, seed=3), verify=False)
    assert unchecked.fold_report.max_rel_error is None and unchecked.fold_report.max_abs_error is None


@pytest.mark.parametrize("all_linear", [False, True])
def test_residual_mlp_emptied_blocks_fold_with_their_skip(all_linear):
    model = ResidualMLP(6, num_classes=3, width=8, hidden=8, depth=3).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in (0, 2):  # emptied blocks: fc1's weights all pruned, its ReLU sees the constant bias
            block = model.blocks[i]
            set_mask(block.fc1, torch.zeros_like(block.fc1.weight, dtype=torch.bool))
            block.fc1.bias.copy_(torch.randn(8, generator=g))
            block.fc1.bias[0] = 0.0  # an exact zero: counted as ZERO, folded as OFF
        if all_linear:  # also force the stem and block 1 into ON/OFF states: the whole net is linear
            bound = force_rows_(model.stem, ON_OFF, 1.0, seed=1)
            bound = force_rows_(model.blocks[1].fc1, ["off", "on"] * 4, 10 * bound, seed=2)
    calib = uniform(256, 6, seed=1)
    if not all_linear:  # the stem and block 1 are genuinely mixed
        place_(model, model.stem, ["free"] * 8, calib, channel_dim=-1)
        place_(model, model.blocks[1].fc1, ["free"] * 8, calib, channel_dim=-1)
    gm, stats = check_fold(model, calib, uniform(256, 6, seed=2))
    report = gm.fold_report
    assert stats.layer_entropy["blocks.0.relu"] == 0.0 and stats.layer_entropy["blocks.2.relu"] == 0.0
    # the emptied blocks output a constant (fc1's bias through the ReLU and fc2): both ops are deleted
    assert report.ops_deleted == ["blocks.0.fc1", "blocks.0.fc2", "blocks.2.fc1", "blocks.2.fc2"]
    assert report.critical_path_after < report.critical_path_before
    assert report.params_after < report.params_before
    if all_linear:
        assert report.rectifier_layers_removed == 4
        assert report.linear_ops_after == 1 and [type(m) for m in linear_modules(gm)] == [nn.Linear]
        assert "skip + blocks.1.fc2" in report.merges
        assert not any(n.op == "call_function" for n in gm.graph.nodes)  # constants went into the biases
    else:
        assert report.removed == ["blocks.0.relu", "blocks.2.relu"]
        assert report.rectifier_layers_removed == 2 and report.rectifier_layers_total == 4
        assert report.linear_ops_before == 8 and report.linear_ops_after == 4 and report.ops_merged == 0
        # block 0 and block 2 became "x + constant": block 0's stays one per-channel offset after the
        # stem's ReLU (x is a ReLU output, read by block 1 and its skip); block 2's went into the head's bias
        adds = [n for n in gm.graph.nodes if n.op == "call_function"]
        assert len(adds) == 1  # block 1's residual addition
        assert [type(m).__name__ for m in gm.modules() if type(m).__name__ in ("ConstantChannels", "ChannelOffset")
                ] == ["ChannelOffset"]


@pytest.mark.parametrize("emptied", [("fc1",), ("fc2",), ("fc1", "fc2")])
def test_emptied_residual_branches_collapse_into_the_head_bias(emptied):
    """The digits MLP with every residual branch emptied by pruning computes head(x + c1 + ... + c8)
    after relu(stem(x)): the constants are summed and go into the head's bias (critical path 3)."""
    model = ResidualMLP(64, 10, width=16, hidden=32, depth=8).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.fc1.bias.normal_()
            block.fc2.bias.normal_()
    empty_layers(model, [f"blocks.{k}.{name}" for k in range(8) for name in emptied])
    calib = torch.randn(512, 1, 8, 8)
    folded = fold(model, measure(model, [calib]), calib, planner="all")
    report = folded.fold_report
    assert report.critical_path_before == 35 and report.critical_path_after == 3
    assert [n.target for n in folded.graph.nodes if n.op == "call_module"] == ["flatten", "stem", "stem_relu", "head"]
    assert report.max_rel_error <= FP32_TOL
    fresh = torch.randn(7, 1, 8, 8)
    with torch.no_grad():
        assert rel_err(folded(fresh), model(fresh)) <= FP32_TOL  # the constants do not depend on the input


def test_conv_bn_chain_merges_1x1_and_padded_second_conv_with_border_correction():
    """SmallCNN (width 4): conv1 3×3 + BN + ReLU (forced) → conv2 1×1 + BN: merged into one 3×3;
    conv3 3×3 + BN + ReLU (forced) → conv4 3×3 padded: merged into one 5×5 whose border is corrected
    (a composed kernel alone would see conv3's response where conv4 saw zero padding)."""
    model = SmallCNN(in_channels=1, num_classes=3, input_size=8, width=4).eval()
    f = model.features
    calib = uniform(256, 1, 8, 8, seed=1)
    random_conv_bn_(f.conv1, f.bn1, [1], seed=1)
    place_(model, f.bn1, ["on", "off", "on", "on"], calib)
    random_conv_bn_(f.conv2, f.bn2, [], seed=2)
    place_(model, f.bn2, ["free"] * 4, calib)
    random_conv_bn_(f.conv3, f.bn3, [1, 4], seed=3)
    place_(model, f.bn3, ["on", "off", "on", "on", "off", "on", "on", "on"], calib)
    random_conv_bn_(f.conv4, f.bn4, [], seed=4)
    place_(model, f.bn4, ["free"] * 8, calib)
    force_rows_(model.fc1, ["free"] * 16, 1.0, seed=5)
    place_(model, model.fc1, ["free"] * 16, calib)
    gm, stats = check_fold(model, calib, uniform(256, 1, 8, 8, seed=2))
    report = gm.fold_report
    assert stats.zero_entropy_layers == ["features.relu1", "features.relu3"]
    assert report.batchnorms_fused == 4
    assert report.removed == ["features.relu1", "features.relu3"]
    assert report.merges == ["features.conv1 + features.conv2", "features.conv3 + features.conv4"]
    assert report.ops_merged == 2 and report.skipped == []
    assert report.channels_removed == {"features.conv1": 1, "features.conv3": 2}  # before merging
    assert gm.features.conv2.kernel_size == (3, 3) and gm.features.conv2.padding == (1, 1)
    assert isinstance(gm.features.conv4, BorderCorrectedConv) and gm.features.conv4.kernel_size == (5, 5)
    assert gm.features.conv4.padding == (2, 2)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    assert report.linear_ops_before == 6 and report.linear_ops_after == 4
    assert report.critical_path_after < report.critical_path_before
    assert report.params_after < report.params_before


class ConvResidual(nn.Module):
    """x + conv2(relu(conv1(x))) with conv1 k×k "same" padded and conv2 1×1, then a pooled head."""

    def __init__(self, conv: type, channels: int = 4):
        super().__init__()
        self.conv1 = conv(channels, channels, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = conv(channels, channels, 1)
        self.head = nn.Linear(channels, 3)

    def forward(self, x):
        y = x + self.conv2(self.relu(self.conv1(x)))
        return self.head(y.flatten(2).mean(2))


@pytest.mark.parametrize("conv, spatial", [(nn.Conv2d, (7, 9)), (nn.Conv1d, (11,))], ids=["2d", "1d"])
def test_conv_residual_block_folds_into_one_conv_with_centred_delta(conv, spatial):
    model = ConvResidual(conv).eval()
    calib = uniform(128, 4, *spatial, seed=1)
    keep = torch.ones_like(model.conv1.weight, dtype=torch.bool)
    keep[1] = False  # the OFF channel is a pruned row: constant, so it is deleted
    set_mask(model.conv1, keep)
    place_(model, model.conv1, ["on", "off", "on", "on"], calib)
    gm, _ = check_fold(model, calib, uniform(128, 4, *spatial, seed=2))
    report = gm.fold_report
    assert report.merges == ["conv1 + conv2", "skip + conv2"] and report.ops_merged == 2
    assert report.channels_removed == {"conv1": 1}
    assert isinstance(gm.conv2, conv) and gm.conv2.kernel_size == (3,) * len(spatial)
    assert report.linear_ops_after == 2 and report.critical_path_after < report.critical_path_before
    assert sum(1 for n in gm.graph.nodes if n.op == "call_function") == 0  # the add is gone


def test_leaky_relu_on_and_off_channels_are_linear():
    # "neg" rows keep their weights: LeakyReLU multiplies them by 0.1 instead of zeroing them
    states = ["on", "neg", "on", "neg", "on", "on", "neg", "on"]
    model = forced_chain(nn.LeakyReLU(0.1), [states, states[::-1], states])
    gm, stats = check_fold(model, uniform(256, 6, seed=1), uniform(256, 6, seed=2))
    assert int(stats.always_off["act"].sum()) == 3
    report = gm.fold_report
    assert report.rectifier_layers_removed == 3 and report.linear_ops_after == 1
    assert report.channels_removed == {}  # OFF neurons still carry a signal (slope 0.1): nothing removed


def test_relu6_saturated_channels_become_constants():
    states = ["sat", "lin6", "off", "lin6", "sat", "lin6", "lin6", "lin6"]
    model = forced_chain(nn.ReLU6(), [states, ["lin6"] * 6 + ["sat", "off"]], cap=6.0)
    gm, stats = check_fold(model, uniform(256, 6, seed=1), uniform(256, 6, seed=2))
    assert int(stats.always_saturated["act"].sum()) == 2 and int(stats.always_saturated["act#1"].sum()) == 1
    report = gm.fold_report
    assert report.removed == ["act", "act#1"] and report.linear_ops_after == 1
    # saturated (constant 6) and OFF (constant 0) channels are deleted, the 6s go into the next bias
    assert report.channels_removed == {"fcs.0": 3, "fcs.1": 2}


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.head(self.fc3(x).relu())


def test_functional_activations_fold():
    model = Functional().eval()
    bound = 1.0
    for i, fc in enumerate([model.fc1, model.fc2, model.fc3]):
        bound = force_rows_(fc, ON_OFF, bound, seed=i)
    gm, stats = check_fold(model, uniform(256, 6, seed=1), uniform(256, 6, seed=2))
    assert set(stats.histogram) == {"relu()", "relu()#1", "relu()#2"}
    report = gm.fold_report
    assert report.rectifier_layers_total == 3 and report.rectifier_layers_removed == 3
    assert report.linear_ops_after == 1


def test_one_relu_module_called_at_every_layer():
    model = forced_chain(nn.ReLU(), [ON_OFF, ON_OFF[::-1]])
    gm, stats = check_fold(model, uniform(256, 6, seed=1), uniform(256, 6, seed=2))
    assert set(stats.histogram) == {"act", "act#1"}
    assert gm.fold_report.removed == ["act", "act#1"] and gm.fold_report.linear_ops_after == 1


def test_one_relu_module_called_twice_only_first_call_linear():
    model = forced_chain(nn.ReLU(), [ON_OFF, ["free"] * 8])
    gm, stats = check_fold(model, uniform(256, 6, seed=1), uniform(256, 6, seed=2))
    assert stats.layer_entropy["act#1"] > 0
    report = gm.fold_report
    assert report.removed == ["act"] and report.merges == ["fcs.0 + fcs.1"]
    # the module stays, called once now, at the second call site
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["fcs.1", "act", "head"]


# --------------------------------------------------------------------------------------------------
# Approximate rectifiers, strict mode, errors
# --------------------------------------------------------------------------------------------------


class GeluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.head = nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.act(self.fc1(x)))


def gelu_net() -> GeluNet:
    model = GeluNet().eval()
    with torch.no_grad():
        force_rows_(model.fc1, ["on"] * 8, 1.0, seed=0)
        model.fc1.bias += 3.0  # GELU inputs ≥ 3.25: φ(z) ≈ z, but not exactly
    return model


def test_gelu_is_skipped_unless_approximate():
    model = gelu_net()
    x = uniform(128, 6, seed=1)
    stats = measure(model, [x])
    assert stats.layer_entropy["act"] == 0.0
    gm = fold(model, stats, x)
    report = gm.fold_report
    assert report.removed == [] and report.approximated == [] and report.rectifier_layers_removed == 0
    assert len(report.skipped) == 1 and report.skipped[0]["node"] == "act"
    assert "approximate=True" in report.skipped[0]["reason"]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an approximation beyond 1e-5 is reported, not warned about
        approx = fold(model, stats, x, approximate=True)
    report = approx.fold_report
    assert report.removed == ["act"] and report.approximated == ["act"] and report.linear_ops_after == 1
    assert 0.0 < report.max_rel_error < 1e-2  # measured and reported, never silent


def test_strict_raises_fold_error_naming_the_node():
    model = gelu_net()
    x = uniform(128, 6, seed=1)
    with pytest.raises(FoldError, match="'act'.*approximate=True"):
        fold(model, measure(model, [x]), x, strict=True)


def test_example_input_outside_calibration_states_warns_or_raises():
    model = forced_chain(nn.ReLU(), [ON_OFF, ON_OFF])
    x = uniform(128, 6, seed=1)
    stats = measure(model, [x])
    far = 100 * uniform(16, 6, seed=2)  # leaves the ON states: the fold is not exact there
    with pytest.warns(UserWarning, match="leaves neuron states"):
        gm = fold(model, stats, far)
    assert gm.fold_report.max_rel_error > FP32_TOL
    with pytest.raises(FoldError, match="max relative error"):
        fold(model, stats, far, strict=True)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.head = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: not traceable
            x = -x
        return self.head(self.act(self.fc1(x)))


def test_untraceable_model_is_folded_by_modules_and_says_why():
    """Without a graph fold takes the module route (nepenthe.fold.blocks, tested in
    tests/test_untraceable_models.py) and its report keeps the actionable trace error."""
    model = DataDependent().eval()
    x = uniform(32, 6, seed=1)
    with pytest.warns(UserWarning, match="forward hooks"):
        stats = measure(model, [x])  # measuring falls back to hooks
    folded = fold(model, stats, x)
    why = folded.fold_report.skipped[0]
    assert why["node"] == "(model)" and "data-dependent Python control flow" in why["reason"]
    assert "DataDependent" in why["reason"] and "torch.fx" in why["reason"]
    torch.testing.assert_close(folded(x), model(x))


def test_stats_of_another_model_are_refused():
    x = uniform(64, 6, seed=1)
    mlp = forced_chain(nn.ReLU(), [["on"] * 8, ["on"] * 8])
    stats = measure(mlp, [x])
    other = ResidualMLP(6, 3, width=8, hidden=8, depth=1).eval()
    with pytest.raises(FoldError, match="measure this model"):
        fold(other, stats, x)
    # same call-site names, other widths: the neuron counts give it away
    wider = Chain(nn.ReLU(), depth=2, width=16).eval()
    with pytest.raises(FoldError, match="neurons"):
        fold(wider, stats, x)


def test_fold_leaves_the_model_alone():
    model = forced_chain(nn.ReLU(), [ON_OFF, ON_OFF])
    model.train()
    x = uniform(64, 6, seed=1)
    stats = measure(model, [x])
    before = copy.deepcopy(model.state_dict())
    assert "fcs.0.weight_mask" in before
    gm = fold(model, stats, x)
    assert model.training  # mode restored
    after = model.state_dict()  # weights and masks untouched (the fold works on a copy)
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert get_mask(model.fcs[1]) is not None
    assert isinstance(model.act, nn.ReLU) and len(model.fcs) == 2
    assert not gm.training
