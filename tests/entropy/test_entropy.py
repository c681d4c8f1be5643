"""Tests for nepenthe.entropy: measuring sign histograms of every rectifier call site.

Most models here have hand-set weights so that each neuron's sign pattern is known by
construction; the expected histograms are then written out literally.
"""

from __future__ import annotations

import copy
import io
import math
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from nepenthe import ops
from nepenthe.entropy import (
    EntropyOptions,
    EntropyStats,
    MeasureError,
    NonFiniteActivationError,
    StatsRecorder,
    describe_sites,
    measure,
)
from nepenthe.models.resnet import resnet18_cifar

# --------------------------------------------------------------------------------------------------
# A Linear layer whose four neurons have known sign patterns
# --------------------------------------------------------------------------------------------------
#
# input rows are (s, 1) for s in S; the Linear computes
#   neuron 0: z = 4·1 + 4 = 8         always ON (and at/above ReLU6's kink: always SAT)
#   neuron 1: z = -1·1 - 1 = -2       always OFF
#   neuron 2: z = 3·s                 9, -3, 6, 0, -12, 15, 3, -6: ON 4, OFF 3, ZERO 1, SAT(>= 6) 3
#   neuron 3: z = 0                   always exactly ZERO

S = [3.0, -1.0, 2.0, 0.0, -4.0, 5.0, 1.0, -2.0]
HIST = [[8, 0, 0, 0], [0, 8, 0, 0], [4, 3, 1, 0], [0, 0, 8, 0]]
HIST_SAT = [[8, 0, 0, 8], [0, 8, 0, 0], [4, 3, 1, 3], [0, 0, 8, 0]]


def H2(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def inputs(values=S) -> torch.Tensor:
    return torch.tensor([[s, 1.0] for s in values])


def fixed_linear(scale: float = 3.0) -> nn.Linear:
    fc = nn.Linear(2, 4)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[0.0, 4.0], [0.0, -1.0], [scale, 0.0], [0.0, 0.0]]))
        fc.bias.copy_(torch.tensor([4.0, -1.0, 0.0, 0.0]))
    return fc


class ModuleAct(nn.Module):
    def __init__(self, act: nn.Module, scale: float = 3.0):
        super().__init__()
        self.fc = fixed_linear(scale)
        self.act = act

    def forward(self, x):
        return self.act(self.fc(x))


class FunctionalAct(nn.Module):
    def __init__(self, fn, scale: float = 3.0):
        super().__init__()
        self.fc = fixed_linear(scale)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.fc(x))


class MethodAct(nn.Module):
    def __init__(self, inplace: bool = False):
        super().__init__()
        self.fc = fixed_linear()
        self.inplace = inplace

    def forward(self, x):
        z = self.fc(x)
        return z.relu_() if self.inplace else z.relu()


# kind, module factory, functional, upper kink
RECTIFIERS = [
    ("relu", nn.ReLU, F.relu, None),
    ("relu6", nn.ReLU6, F.relu6, 6.0),
    ("leaky_relu", lambda: nn.LeakyReLU(0.1), lambda z: F.leaky_relu(z, 0.1), None),
    ("gelu", nn.GELU, F.gelu, None),
    ("silu", nn.SiLU, F.silu, None),
    ("hardswish", nn.Hardswish, F.hardswish, None),
]


def _check_fixed_stats(stats: EntropyStats, key: str, upper):
    assert list(stats.histogram) == [key]
    h = stats.histogram[key]
    assert h.dtype == torch.int64
    expected = HIST_SAT if upper is not None else HIST
    assert h.tolist() == expected
    ent = stats.neuron_entropy[key]
    if upper is None:
        # neuron 2: ON 4 vs OFF 3 (the zero excluded) -> H(4/7) = 0.985228
        n2 = H2(4 / 7)
        assert ent.tolist() == pytest.approx([0.0, 0.0, n2, 0.0], abs=1e-12)
        assert stats.always_on[key].tolist() == [True, False, False, False]
        assert stats.always_saturated[key].tolist() == [False, False, False, False]
    else:
        # neuron 2 with a kink: OFF 3, linear 1 (the 3), SAT 3 of 7 -> three-region entropy
        n2 = -(2 * (3 / 7) * math.log2(3 / 7) + (1 / 7) * math.log2(1 / 7))
        assert n2 == pytest.approx(1.448816, abs=1e-6)
        assert ent.tolist() == pytest.approx([0.0, 0.0, n2, 0.0], abs=1e-12)
        assert stats.always_on[key].tolist() == [False, False, False, False]  # neuron 0 is saturated
        assert stats.always_saturated[key].tolist() == [True, False, False, False]
    assert stats.always_off[key].tolist() == [False, True, False, True]
    assert stats.layer_entropy[key] == pytest.approx(n2 / 4, abs=1e-12)
    assert stats.zero_entropy_layers == []
    assert not stats.linearizable(key)
    assert stats.num_samples[key] == 8
    assert stats.batches == 1


@pytest.mark.parametrize("kind, module, functional, upper", RECTIFIERS, ids=[r[0] for r in RECTIFIERS])
def test_module_rectifiers(kind, module, functional, upper):
    stats = measure(ModuleAct(module()), [inputs()])
    _check_fixed_stats(stats, "act", upper)
    site = stats.sites["act"]
    assert site.rectifier.kind == kind
    assert site.rectifier.upper == upper
    assert site.producer == "fc"
    assert site.module_path == "act"
    assert site.channel_dim == -1


@pytest.mark.parametrize("kind, module, functional, upper", RECTIFIERS, ids=[r[0] for r in RECTIFIERS])
def test_functional_rectifiers(kind, module, functional, upper):
    stats = measure(FunctionalAct(functional), [inputs()])
    key = f"{kind}()"
    _check_fixed_stats(stats, key, upper)
    assert stats.sites[key].rectifier.kind == kind
    assert stats.sites[key].producer == "fc"
    assert stats.sites[key].module_path is None


def test_leaky_relu_slope_recorded():
    stats = measure(FunctionalAct(lambda z: F.leaky_relu(z, negative_slope=0.25)), [inputs()])
    assert stats.sites["leaky_relu()"].rectifier.off_slope == 0.25
    stats = measure(ModuleAct(nn.LeakyReLU(0.3)), [inputs()])
    assert stats.sites["act"].rectifier.off_slope == pytest.approx(0.3)


@pytest.mark.parametrize("module", [nn.ReLU(inplace=True), nn.ReLU6(inplace=True), nn.LeakyReLU(0.1, inplace=True),
                                    nn.SiLU(inplace=True), nn.Hardswish(inplace=True)],
                         ids=["relu", "relu6", "leaky", "silu", "hardswish"])
def test_inplace_modules_measured_before_they_run(module):
    upper = 6.0 if isinstance(module, nn.ReLU6) else None
    _check_fixed_stats(measure(ModuleAct(module), [inputs()]), "act", upper)
    # the hook route (StatsRecorder) also sees the input before the inplace op overwrites it
    model = ModuleAct(copy.deepcopy(module))
    with StatsRecorder(model) as rec:
        model(inputs())
    _check_fixed_stats(rec.stats(), "act", upper)


@pytest.mark.parametrize("fn, key", [
    (torch.relu, "relu()"),
    (lambda z: F.relu(z, inplace=True), "relu()"),
    (lambda z: torch.relu_(z), "relu_()"),
    (lambda z: F.relu6(z, inplace=True), "relu6()"),
    (lambda z: F.gelu(z, approximate="tanh"), "gelu()"),
])
def test_functional_variants(fn, key):
    stats = measure(FunctionalAct(fn), [inputs()])
    _check_fixed_stats(stats, key, 6.0 if "relu6" in key else None)


@pytest.mark.parametrize("inplace, key", [(False, "relu()"), (True, "relu_()")])
def test_tensor_method(inplace, key):
    _check_fixed_stats(measure(MethodAct(inplace), [inputs()]), key, None)


def test_gelu_approximate_recorded():
    stats = measure(FunctionalAct(lambda z: F.gelu(z, approximate="tanh")), [inputs()])
    assert stats.sites["gelu()"].rectifier.approximate == "tanh"
    assert stats.sites["gelu()"].rectifier.exact is False
    stats = measure(ModuleAct(nn.GELU(approximate="tanh")), [inputs()])
    assert stats.sites["act"].rectifier.approximate == "tanh"


def test_zero_entropy_layer_is_linearizable():
    # scale 0: neuron 2 is identically 0 too -> every neuron constant
    stats = measure(ModuleAct(nn.ReLU(), scale=0.0), [inputs()])
    assert stats.histogram["act"].tolist() == [[8, 0, 0, 0], [0, 8, 0, 0], [0, 0, 8, 0], [0, 0, 8, 0]]
    assert stats.layer_entropy["act"] == 0.0
    assert stats.zero_entropy_layers == ["act"]
    assert stats.linearizable("act")
    stats6 = measure(ModuleAct(nn.ReLU6(), scale=0.0), [inputs()])
    assert stats6.linearizable("act") and stats6.zero_entropy_layers == ["act"]
    summary = stats6.summary()["act"]
    assert summary == {"neurons": 4, "entropy": 0.0, "always_off": 3, "always_on": 0, "always_saturated": 1,
                       "producer": "fc"}


def test_all_positive_data_gives_zero_entropy():
    stats = measure(ModuleAct(nn.ReLU()), [inputs([1.0, 2.0, 3.0])])
    assert stats.histogram["act"].tolist() == [[3, 0, 0, 0], [0, 3, 0, 0], [3, 0, 0, 0], [0, 0, 3, 0]]
    assert stats.zero_entropy_layers == ["act"]
    assert stats.always_on["act"].tolist() == [True, False, True, False]


# --------------------------------------------------------------------------------------------------
# options: zero_as, aggregate, estimator
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero_as, aggregate, expected", [
    # neuron 2 is ON 4, OFF 3, ZERO 1; neuron 3 is ZERO 8; neurons 0, 1 constant
    ("exclude", "mean", H2(4 / 7) / 4),  # 0.985228 / 4
    ("exclude", "sum", H2(4 / 7)),
    ("exclude", "mixed_mean", H2(4 / 7)),  # only neuron 2 mixed
    ("off", "mean", H2(4 / 8) / 4),  # ON 4 vs OFF 4: 1 bit; neuron 3 all OFF -> 0
    ("off", "mixed_mean", 1.0),
    ("on", "mean", H2(5 / 8) / 4),  # ON 5 vs OFF 3: 0.954434; neuron 3 all ON -> 0
    ("on", "sum", H2(5 / 8)),
])
def test_measure_options(zero_as, aggregate, expected):
    stats = measure(ModuleAct(nn.ReLU()), [inputs()], zero_as=zero_as, aggregate=aggregate)
    assert stats.options == EntropyOptions(zero_as, aggregate, "pooled")
    assert stats.layer_entropy["act"] == pytest.approx(expected, abs=1e-12)
    assert stats.histogram["act"].tolist() == HIST  # counts do not depend on the options


@pytest.mark.parametrize("kwargs", [{"zero_as": "x"}, {"aggregate": "max"}, {"estimator": "median"}])
def test_invalid_options(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        measure(ModuleAct(nn.ReLU()), [inputs()], **kwargs)
    with pytest.raises(ValueError):
        StatsRecorder(ModuleAct(nn.ReLU()), **kwargs)


class Identity2(nn.Module):
    """Linear(2, 2) = identity, then ReLU: the neurons are the input columns."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(2))
            self.fc.bias.zero_()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(x))


def test_batch_mean_vs_pooled():
    # neuron 0 is constant within each batch but flips between batches;
    # neuron 1 is mixed: batch 1 ON 2 / OFF 2, batch 2 ON 1 / OFF 3
    b1 = torch.tensor([[1.0, 1.0], [2.0, -1.0], [3.0, 2.0], [4.0, -2.0]])
    b2 = torch.tensor([[-1.0, 1.0], [-2.0, -1.0], [-3.0, -2.0], [-4.0, -3.0]])
    model = Identity2()
    pooled = measure(model, [b1, b2])
    batch = measure(model, [b1, b2], estimator="batch_mean")
    assert torch.equal(pooled.histogram["act"], batch.histogram["act"])
    assert pooled.histogram["act"].tolist() == [[4, 4, 0, 0], [3, 5, 0, 0]]
    # pooled: neuron 0 p = 4/8 -> 1 bit; neuron 1 p = 3/8 -> 0.954434; layer mean 0.977217
    assert pooled.neuron_entropy["act"].tolist() == pytest.approx([1.0, H2(3 / 8)], abs=1e-12)
    assert pooled.layer_entropy["act"] == pytest.approx((1.0 + H2(3 / 8)) / 2, abs=1e-12)
    # batch mean: neuron 0 is 0 in both batches; neuron 1 (1 + 0.811278) / 2 = 0.905639
    assert batch.neuron_entropy["act"].tolist() == pytest.approx([0.0, (1.0 + H2(1 / 4)) / 2], abs=1e-12)
    # layer: batch 1 (0 + 1) / 2 = 0.5, batch 2 (0 + 0.811278) / 2 = 0.405639 -> mean 0.452820
    assert batch.layer_entropy["act"] == pytest.approx((0.5 + H2(1 / 4) / 2) / 2, abs=1e-12)
    assert batch.batches == 2
    # neuron states come from pooled counts under both estimators
    assert batch.always_on["act"].tolist() == [False, False]
    # batch_mean with "sum": batch 1 sum 1, batch 2 sum 0.811278
    s = measure(model, [b1, b2], estimator="batch_mean", aggregate="sum")
    assert s.layer_entropy["act"] == pytest.approx((1.0 + H2(1 / 4)) / 2, abs=1e-12)


def test_batch_mean_merge():
    b = [torch.tensor([[1.0, -1.0], [2.0, 1.0]]), torch.tensor([[-1.0, -1.0], [-2.0, 1.0]]),
         torch.tensor([[1.0, 1.0], [-2.0, 1.0]])]
    model = Identity2()
    whole = measure(model, b, estimator="batch_mean")
    merged = measure(model, b[:1], estimator="batch_mean").merge_(measure(model, b[1:], estimator="batch_mean"))
    assert merged.batches == 3
    assert torch.equal(merged.histogram["act"], whole.histogram["act"])
    assert merged.neuron_entropy["act"].tolist() == pytest.approx(whole.neuron_entropy["act"].tolist(), abs=1e-12)
    assert merged.layer_entropy["act"] == pytest.approx(whole.layer_entropy["act"], abs=1e-12)


# --------------------------------------------------------------------------------------------------
# call sites: reuse, naming, producers, channel dims
# --------------------------------------------------------------------------------------------------


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)
        self.fc3 = nn.Linear(3, 6)
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        return self.act(self.fc3(x))


def test_module_called_at_several_sites_gets_separate_keys():
    torch.manual_seed(0)
    model = Reused()
    x = torch.randn(16, 4)
    stats = measure(model, [x])
    assert list(stats.histogram) == ["act", "act#1", "act#2"]
    assert [stats.histogram[k].shape[0] for k in stats.histogram] == [5, 3, 6]
    assert [stats.sites[k].producer for k in stats.histogram] == ["fc1", "fc2", "fc3"]
    with torch.no_grad():
        z1 = model.fc1(x)
        z2 = model.fc2(z1.relu())
        z3 = model.fc3(z2.relu())
    for key, z in zip(["act", "act#1", "act#2"], [z1, z2, z3], strict=True):
        assert torch.equal(stats.histogram[key], ops.sign_histogram(z, -1))
    # the hook route names them the same way
    with StatsRecorder(model) as rec:
        model(x[:8])
        model(x[8:])
    hooked = rec.stats()
    assert list(hooked.histogram) == ["act", "act#1", "act#2"]
    for key in stats.histogram:
        assert torch.equal(hooked.histogram[key], stats.histogram[key])
        assert hooked.sites[key].producer == stats.sites[key].producer


class SharedBlock(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.act = act  # the parent's activation module, registered here under a second name

    def forward(self, x):
        return self.act(self.fc(x))


class SharedAct(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.act = nn.ReLU()
        self.b1 = SharedBlock(self.act)
        self.b2 = SharedBlock(self.act)

    def forward(self, x):
        return self.b2(self.b1(x))


def test_module_shared_under_several_names():
    model = SharedAct()
    x = torch.randn(6, 3)
    stats = measure(model, [x])
    assert list(stats.histogram) == ["act", "act#1"]  # fx names a module by its first path
    assert stats.sites["act"].producer == "b1.fc" and stats.sites["act#1"].producer == "b2.fc"
    with torch.no_grad():
        z1 = model.b1.fc(x)
        z2 = model.b2.fc(z1.relu())
    assert torch.equal(stats.histogram["act"], ops.sign_histogram(z1, -1))
    assert torch.equal(stats.histogram["act#1"], ops.sign_histogram(z2, -1))
    # the hook route counts each call once, under the same names
    with StatsRecorder(model) as rec:
        model(x)
    hooked = rec.stats()
    assert list(hooked.histogram) == ["act", "act#1"]
    for k in stats.histogram:
        assert torch.equal(hooked.histogram[k], stats.histogram[k])


def test_measure_does_not_modify_a_graph_module():
    model = torch.fx.symbolic_trace(Reused())
    code, children = model.code, [n for n, _ in model.named_children()]
    x = torch.randn(5, 4)
    first = measure(model, [x])
    assert model.code == code and [n for n, _ in model.named_children()] == children
    kept = {k: v.clone() for k, v in first.histogram.items()}
    model(x)  # later forwards of the user's model must not count into the returned statistics
    second = measure(model, [x])
    assert list(second.histogram) == ["act", "act#1", "act#2"]
    for k in kept:
        assert torch.equal(first.histogram[k], kept[k])
        assert torch.equal(second.histogram[k], kept[k])
    assert second.sites["act#1"].producer == "fc2"


class Blocks(nn.Module):
    """Functional activations inside submodules are named after their owner module."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return F.relu(self.fc(x))

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(self.Block(), self.Block())
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        return F.silu(self.head(self.blocks(x)))


def test_functional_names_use_owner_module():
    stats = measure(Blocks(), [torch.randn(6, 4)])
    assert list(stats.histogram) == ["blocks.0.relu()", "blocks.1.relu()", "silu()"]
    assert stats.sites["blocks.1.relu()"].producer == "blocks.1.fc"
    assert stats.sites["silu()"].producer == "head"
    assert set(describe_sites(Blocks())) == set(stats.histogram)


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 5)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.fc(x))


def test_token_layers_use_last_dim_and_channel_dims_override():
    torch.manual_seed(1)
    model = Tokens()
    x = torch.randn(2, 7, 3)  # N x T x C
    stats = measure(model, [x])
    with torch.no_grad():
        z = model.fc(x)
    assert stats.sites["act"].channel_dim == -1
    assert torch.equal(stats.histogram["act"], ops.sign_histogram(z, -1))
    assert stats.num_samples["act"] == 14
    over = measure(model, [x], channel_dims={"act": 1})
    assert over.sites["act"].channel_dim == 1
    assert torch.equal(over.histogram["act"], ops.sign_histogram(z, 1))


def test_changing_neuron_count_is_an_error():
    model = nn.Sequential(nn.ReLU())
    with pytest.raises(MeasureError, match="neurons"):
        measure(model, [torch.randn(2, 3), torch.randn(2, 4)])


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.act2 = nn.ReLU6()
        with torch.no_grad():  # small integers: every conv output is exact in any summation order
            for conv in (self.conv1, self.conv2):
                conv.weight.copy_(torch.randint(-1, 2, conv.weight.shape, generator=g).float())
                conv.bias.copy_(torch.randint(-2, 3, conv.bias.shape, generator=g).float())

    def forward(self, x):
        return F.leaky_relu(self.act2(self.conv2(self.act1(self.conv1(x)))), 0.1)


def conv_data(n: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, (n, 3, 5, 5), generator=g).float()


def test_nchw_and_channels_last_identical():
    model = ConvNet()
    x = conv_data()
    ref = measure(model, [x])
    assert list(ref.histogram) == ["act1", "act2", "leaky_relu()"]
    assert [ref.sites[k].channel_dim for k in ref.histogram] == [1, 1, 1]
    assert ref.histogram["act1"].shape == (6, 4) and ref.histogram["act2"].shape == (5, 4)
    assert ref.histogram["leaky_relu()"].shape == (5, 4)
    assert (ref.histogram["act2"][:, ops.SAT] > 0).any()  # the kink is reached
    assert (ref.histogram["act1"][:, ops.ZERO] > 0).any()  # exact zeros occur
    with torch.no_grad():
        z1 = model.conv1(x)
    assert torch.equal(ref.histogram["act1"], ops.sign_histogram(z1, 1))
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_cl = x.to(memory_format=torch.channels_last)
    for m, inp in [(cl_model, x_cl), (model, x_cl), (cl_model, x)]:
        got = measure(m, [inp])
        assert list(got.histogram) == list(ref.histogram)
        for k in ref.histogram:
            assert torch.equal(got.histogram[k], ref.histogram[k]), k


def test_counts_add_up_across_batches():
    model = ConvNet()
    x = conv_data(8)
    one = measure(model, [x])
    two = measure(model, [x[:4], x[4:]])
    merged = measure(model, [x[:4]]).merge_(measure(model, [x[4:]]))
    for k in one.histogram:
        assert torch.equal(two.histogram[k], one.histogram[k])
        assert torch.equal(merged.histogram[k], one.histogram[k])
        assert one.layer_entropy[k] == merged.layer_entropy[k]
    assert one.num_samples["act1"] == 8 * 25
    assert two.batches == 2 and merged.batches == 2
    assert measure(model, [x[:4], x[4:]], max_batches=1).num_samples["act1"] == 4 * 25


def test_merge_adds_new_sites():
    a = measure(ModuleAct(nn.ReLU()), [inputs()])
    b = measure(FunctionalAct(F.relu), [inputs()])
    a.merge_(b)
    assert set(a.histogram) == {"act", "relu()"}
    assert a.histogram["relu()"].tolist() == HIST
    assert a.histogram["relu()"] is not b.histogram["relu()"]


class ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in = nn.Linear(4, 6)
        self.act_in = nn.ReLU()
        self.fc1 = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.0)
        self.act = nn.ReLU()

    def forward(self, x):
        h = self.act_in(self.fc_in(x))
        return self.act(self.drop(self.bn(self.fc1(h))) + h)


def test_producer_through_bn_dropout_and_residual():
    sites = describe_sites(ResidualMLP())
    assert sites["act_in"].producer == "fc_in"
    assert sites["act"].producer == "fc1"


def test_resnet18_producers():
    model = resnet18_cifar()
    sites = describe_sites(model)
    names = ["relu"] + [f"layer{s}.{b}.relu{r}" for s in range(1, 5) for b in range(2) for r in (1, 2)]
    assert list(sites) == names
    assert sites["relu"].producer == "conv1"
    for s in range(1, 5):
        for b in range(2):
            assert sites[f"layer{s}.{b}.relu1"].producer == f"layer{s}.{b}.conv1"
            # relu2 follows bn2(conv2(...)) + skip: the block's body, never the downsample projection
            assert sites[f"layer{s}.{b}.relu2"].producer == f"layer{s}.{b}.conv2"
    assert all(site.channel_dim == 1 for site in sites.values())
    assert model.layer2[0].downsample is not None  # the case that matters is actually present
    stats = measure(model, [torch.randn(2, 3, 32, 32)])
    assert list(stats.histogram) == names
    assert stats.histogram["layer2.0.relu2"].shape == (128, 4)
    assert stats.num_samples["relu"] == 2 * 32 * 32
    assert stats.num_samples["layer4.1.relu2"] == 2 * 2 * 2
    assert stats.sites["layer3.0.relu2"].producer == "layer3.0.conv2"


# --------------------------------------------------------------------------------------------------
# untraceable models, StatsRecorder, model state
# --------------------------------------------------------------------------------------------------


class Twin(nn.Module):
    def __init__(self, data_dependent: bool):
        super().__init__()
        torch.manual_seed(3)
        self.fc1 = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(6, 5)
        self.act2 = nn.ReLU6()
        self.data_dependent = data_dependent

    def forward(self, x):
        h = self.act(self.fc1(x) * 4)
        if self.data_dependent and x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            h = h + 0.0
        h = self.act(self.fc2(h))
        return F.relu(self.act2(h * 3 - 1))


def test_untraceable_model_falls_back_to_hooks():
    x = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    traced = measure(Twin(False), x)
    assert list(traced.histogram) == ["act", "act#1", "act2", "relu()"]
    with pytest.warns(UserWarning, match="forward hooks"):
        hooked = measure(Twin(True), x)
    assert list(hooked.histogram) == ["act", "act#1", "act2"]  # functional relu() is invisible
    for k in hooked.histogram:
        assert torch.equal(hooked.histogram[k], traced.histogram[k]), k
    assert hooked.sites["act"].producer is None  # no graph, no producer
    model = Twin(True)
    with StatsRecorder(model) as rec:  # the recorder needs no trace either
        for xb in x:
            model(xb)
    recorded = rec.stats()
    assert list(recorded.histogram) == list(hooked.histogram)
    for k in hooked.histogram:
        assert torch.equal(recorded.histogram[k], hooked.histogram[k])
    assert (traced.histogram["act2"][:, ops.SAT] > 0).any()


def test_stats_recorder_in_training_mode_equals_measure():
    torch.manual_seed(5)
    model = Reused()
    model.train()
    batches = [torch.randn(5, 4) for _ in range(3)]
    with StatsRecorder(model) as rec:
        for x in batches:
            model(x).sum().backward()  # a training step's forward + backward, no dropout/BN
    assert model.training
    stats = rec.stats()
    ref = measure(model, batches)
    assert model.training  # measure restores the mode
    assert list(stats.histogram) == list(ref.histogram)
    for k in ref.histogram:
        assert torch.equal(stats.histogram[k], ref.histogram[k])
        assert stats.layer_entropy[k] == ref.layer_entropy[k]
        assert stats.sites[k].producer == ref.sites[k].producer
    assert stats.batches == 3
    # hooks are gone after the with block
    model(batches[0])
    assert torch.equal(rec.stats().histogram["act"], stats.histogram["act"])
    rec.reset()
    with pytest.raises(MeasureError, match="no forward pass"):
        rec.stats()


def test_stats_recorder_errors():
    with pytest.raises(MeasureError, match="no rectifier found in Sequential"):
        with StatsRecorder(nn.Sequential(nn.Linear(2, 2))):
            pass
    rec = StatsRecorder(ModuleAct(nn.ReLU()))
    with rec:
        pass
    with pytest.raises(MeasureError, match="no forward pass"):
        rec.stats()
    model = ModuleAct(nn.ReLU())
    bad = inputs()
    bad[2, 0] = float("nan")
    with pytest.raises(NonFiniteActivationError, match="'act'"):
        with StatsRecorder(model):
            model(bad)
    assert not model.act._forward_pre_hooks  # removed even after the error


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = fixed_linear()
        self.fc2 = nn.Linear(4, 4)

    def forward(self, x):
        h = F.dropout(self.fc(x), 0.5, self.training)
        return F.relu(self.fc2(h))


def test_measure_runs_in_eval_mode_and_restores_mode():
    torch.manual_seed(0)
    model = FunctionalDropout()
    x = torch.randn(64, 2)
    model.eval()
    ref = measure(model, [x])
    assert not model.training
    model.train()
    got = measure(model, [x])  # fx bakes self.training into the graph: it must be traced in eval mode
    assert model.training
    assert torch.equal(got.histogram["relu()"], ref.histogram["relu()"])
    bn = ResidualMLP()
    bn.train()
    before = bn.bn.running_mean.clone()
    measure(bn, [torch.randn(16, 4)])
    assert torch.equal(bn.bn.running_mean, before)  # eval mode: BN statistics untouched
    assert bn.training


def test_measure_leaves_model_untouched():
    model = Reused()
    keys = list(model.state_dict())
    measure(model, [torch.randn(3, 4)])
    assert list(model.state_dict()) == keys
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert [n for n, _ in model.named_children()] == ["fc1", "fc2", "fc3", "act"]


def test_measure_no_grad():
    model = ModuleAct(nn.ReLU())
    measure(model, [inputs()])
    assert model.fc.weight.grad is None


# --------------------------------------------------------------------------------------------------
# input handling and errors
# --------------------------------------------------------------------------------------------------


class KwModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = fixed_linear()
        self.act = nn.ReLU()

    def forward(self, x, shift=0.0):  # (a `shift is None` test would be traced as False by fx)
        return self.act(self.fc(x) + shift)


@pytest.mark.parametrize("batch, input_fn", [
    (inputs(), None),
    ((inputs(), torch.zeros(8, dtype=torch.long)), None),  # (input, label)
    ([inputs(), torch.zeros(8, dtype=torch.long)], None),
    ({"x": inputs()}, None),  # keyword arguments
    ({"image": inputs(), "label": 0}, lambda b: b["image"]),
    ({"image": inputs()}, lambda b: [b["image"]]),  # input_fn returning a list of positional inputs
    ((inputs(),), None),
])
def test_batch_formats(batch, input_fn):
    stats = measure(KwModel(), [batch], input_fn=input_fn)
    assert stats.histogram["act"].tolist() == HIST


def test_dict_batch_with_several_kwargs():
    stats = measure(KwModel(), [{"x": inputs(), "shift": torch.full((4,), 100.0)}])
    assert stats.histogram["act"].tolist() == [[8, 0, 0, 0]] * 4


def test_unknown_batch_type():
    with pytest.raises(MeasureError, match="input_fn"):
        measure(KwModel(), [42])
    with pytest.raises(MeasureError, match="input_fn"):
        measure(KwModel(), [()])


def test_generator_and_dataloader_data():
    stats = measure(KwModel(), (inputs()[i:i + 2] for i in range(0, 8, 2)))
    assert stats.histogram["act"].tolist() == HIST and stats.batches == 4
    ds = torch.utils.data.TensorDataset(inputs(), torch.zeros(8))
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    stats = measure(KwModel(), loader)
    assert stats.histogram["act"].tolist() == HIST and stats.batches == 3


def test_no_rectifier_error():
    with pytest.raises(MeasureError) as info:
        measure(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), [torch.randn(2, 3)])
    msg = str(info.value)
    assert "Sequential" in msg
    assert "ReLU" in msg and "GELU" in msg and "functional" in msg


class UntraceableNoAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -x


def test_no_rectifier_error_untraceable_model():
    with pytest.raises(MeasureError, match="no rectifier found in UntraceableNoAct.*could not be traced"):
        measure(UntraceableNoAct(), [torch.randn(2, 3)])


def test_empty_data_error():
    model = ModuleAct(nn.ReLU())
    model.train()
    with pytest.raises(MeasureError, match="no batches"):
        measure(model, [])
    assert model.training
    with pytest.raises(MeasureError, match="no batches"):
        measure(model, iter([]))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_activations_error(bad_value):
    bad = inputs()
    bad[5, 0] = bad_value
    model = ModuleAct(nn.ReLU())
    with pytest.raises(NonFiniteActivationError, match=r"rectifier 'act'.*batch 1"):
        measure(model, [inputs(), bad])
    assert issubclass(NonFiniteActivationError, MeasureError)
    assert model.training  # mode restored after the error
    with pytest.raises(NonFiniteActivationError, match=r"'relu\(\)'"):
        measure(FunctionalAct(F.relu), [bad])


def test_non_finite_second_site_named():
    model = Reused()
    with torch.no_grad():
        model.fc2.bias[0] = float("inf")
    with pytest.raises(NonFiniteActivationError, match="'act#1'"):
        measure(model, [torch.randn(2, 4)])


# --------------------------------------------------------------------------------------------------
# persistence
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["pooled", "batch_mean"])
def test_state_dict_round_trip(estimator):
    model = ConvNet()
    stats = measure(model, [conv_data(4, 0), conv_data(4, 1)], estimator=estimator, zero_as="off",
                    aggregate="mixed_mean")
    buf = io.BytesIO()
    torch.save(stats.state_dict(), buf)
    buf.seek(0)
    loaded = EntropyStats.from_state_dict(torch.load(buf, weights_only=True))
    assert loaded.options == stats.options
    assert loaded.batches == stats.batches == 2
    assert list(loaded.histogram) == list(stats.histogram)
    for k in stats.histogram:
        assert torch.equal(loaded.histogram[k], stats.histogram[k])
        assert loaded.sites[k] == stats.sites[k]
        assert torch.equal(loaded.neuron_entropy[k], stats.neuron_entropy[k])
        assert loaded.layer_entropy[k] == stats.layer_entropy[k]
        assert torch.equal(loaded.always_saturated[k], stats.always_saturated[k])
    assert loaded.summary() == stats.summary()


# --------------------------------------------------------------------------------------------------
# torch.distributed
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_data() -> list[torch.Tensor]:
    return [conv_data(3, seed) for seed in range(4)]


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data = _dist_data()
        shard = data[rank * 2:(rank + 1) * 2]
        model = ConvNet()
        pooled = measure(model, shard, distributed="auto")
        batch_mean = measure(model, shard, estimator="batch_mean")
        local = measure(model, shard, distributed=False)
        torch.save({"pooled": pooled.state_dict(), "batch_mean": batch_mean.state_dict(),
                    "local": local.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="gloo backend unavailable")
def test_distributed_all_reduce_matches_single_process(tmp_path):
    world = 2
    # fork (as DataLoader workers do, one thread each) starts in well under a second; spawn re-imports torch
    # and this module in every child, which takes several seconds
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(_dist_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=False,
                             start_method=method)
    deadline = time.monotonic() + 60
    while not ctx.join(timeout=1):  # raises if a worker failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed workers did not finish within 60 s")
    data = _dist_data()
    ref = measure(ConvNet(), data)
    ref_bm = measure(ConvNet(), data, estimator="batch_mean")
    for rank in range(world):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        pooled = EntropyStats.from_state_dict(saved["pooled"])
        assert list(pooled.histogram) == list(ref.histogram)
        for k in ref.histogram:
            assert torch.equal(pooled.histogram[k], ref.histogram[k]), (rank, k)
            assert pooled.layer_entropy[k] == ref.layer_entropy[k]
        bm = EntropyStats.from_state_dict(saved["batch_mean"])
        assert bm.batches == 4
        for k in ref.histogram:
            assert torch.equal(bm.histogram[k], ref.histogram[k])
            assert bm.layer_entropy[k] == pytest.approx(ref_bm.layer_entropy[k], abs=1e-12)
            assert bm.neuron_entropy[k].tolist() == pytest.approx(ref_bm.neuron_entropy[k].tolist(), abs=1e-12)
        local = EntropyStats.from_state_dict(saved["local"])  # distributed=False: this rank's shard only
        own = measure(ConvNet(), data[rank * 2:(rank + 1) * 2])
        for k in ref.histogram:
            assert torch.equal(local.histogram[k], own.histogram[k])


def test_all_reduce_without_process_group_is_a_noop():
    stats = measure(ModuleAct(nn.ReLU()), [inputs()])
    assert stats.all_reduce_() is stats
    assert stats.histogram["act"].tolist() == HIST


class _OptionalArg(nn.Module):
    """Traces (fx takes `mask is None` as False) but the trace fails on a real call without mask."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x, mask=None):
        if mask is None:
            return self.act(self.fc(x))
        return self.act(self.fc(x) * mask)


def test_trace_that_fails_on_real_inputs_falls_back_to_hooks():
    torch.manual_seed(0)
    model = _OptionalArg()
    data = [torch.randn(6, 4) for _ in range(3)]
    with pytest.warns(UserWarning, match="fails on real inputs"):
        stats = measure(model, data)
    z = torch.cat([model.fc(x) for x in data]).detach()
    assert torch.equal(stats.histogram["act"][:, 0], (z > 0).sum(0))
    assert torch.equal(stats.histogram["act"][:, 1], (z < 0).sum(0))


def test_functional_relu_with_keyword_input():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 5)

        def forward(self, x):
            return F.relu(input=self.fc(x))

    model = KW()
    x = torch.randn(10, 3)
    stats = measure(model, [x])
    (name,) = stats.histogram
    z = model.fc(x).detach()
    assert torch.equal(stats.histogram[name][:, 0], (z > 0).sum(0))


# ----- fused activation + histogram route ------------------------------------------------------------------
class _MixedActs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.relu, self.gelu = nn.ReLU(inplace=True), nn.GELU(approximate="tanh")
        self.leaky = nn.LeakyReLU(0.2)

    def forward(self, x):
        x = self.relu(self.fc1(x))
        x = self.leaky(self.fc2(x))
        x = self.gelu(self.fc3(x))
        return self.fc4(torch.nn.functional.relu6(x * 4))


def test_measure_runs_each_activation_through_the_fused_op(monkeypatch):
    calls = []
    real, real_inplace = ops.activation_histogram, ops.activation_histogram_
    real_acc = ops.accumulate_activation_histogram
    monkeypatch.setattr(ops, "activation_histogram",
                        lambda x, kind, *a, **k: calls.append(kind) or real(x, kind, *a, **k))
    # the pooled estimator adds into the running histogram (batch_mean: activation_histogram)
    monkeypatch.setattr(ops, "accumulate_activation_histogram",
                        lambda x, h, kind, *a, **k: calls.append(kind) or real_acc(x, h, kind, *a, **k))
    monkeypatch.setattr(ops, "activation_histogram_",
                        lambda x, h, kind, *a, **k: calls.append(kind + "_") or real_inplace(x, h, kind, *a, **k))
    torch.manual_seed(0)
    model, x = _MixedActs().eval(), torch.randn(64, 5)
    with torch.no_grad():
        want_out = model(x)
    stats = measure(model, [x])
    assert sorted(calls) == sorted(["relu_", "leaky_relu", "gelu_tanh", "relu6"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), want_out)
        z1 = model.fc1(x)
        z2 = model.fc2(torch.relu(z1))
    torch.testing.assert_close(stats.histogram["relu"], ops.reference.sign_histogram(z1, -1), rtol=0, atol=0)
    torch.testing.assert_close(stats.histogram["leaky"], ops.reference.sign_histogram(z2, -1), rtol=0, atol=0)


def test_stats_recorder_training_is_fused_and_gradients_unchanged():
    torch.manual_seed(0)
    model, plain = _MixedActs(), _MixedActs()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(32, 5)
    with StatsRecorder(model) as rec:
        assert "forward" in vars(model.gelu)  # the fused forward is installed on the instance
        model(x).square().mean().backward()
    assert "forward" not in vars(model.gelu) and "forward" not in vars(model.relu)
    plain(x).square().mean().backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    stats = rec.stats(distributed=False)
    with torch.no_grad():
        z3 = model.fc3(model.leaky(model.fc2(torch.relu(model.fc1(x)))))
    torch.testing.assert_close(stats.histogram["gelu"], ops.reference.sign_histogram(z3, -1), rtol=0, atol=0)
    assert stats.histogram["relu"].sum() == 32 * 8  # the inplace ReLU under autograd: counted unfused
