"""Folding the blocks real networks are made of (issue 4): ResNet BasicBlock / Bottleneck (in the
torchvision style: one shared inplace ReLU, ``out += identity``), MobileNetV2 inverted residuals,
VGG, transformer MLPs (with and without residual, pre-norm), emptied convs, the fold planner.

Neuron states are forced with ``nepenthe.fold.preview.forced_stats`` and every folded model is
compared with ``linearized(model, stats)`` (the model with each rectifier replaced by what the
statistics say it computes) on FRESH inputs: folding must be exact on any input, not only on the
calibration batch.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch
import torch.nn as nn

from nepenthe import FoldError, fold, load, save
from nepenthe.fold.modules import ChannelOffset, ConstantChannels
from nepenthe.fold.preview import NeuronState, empty_layers, forced_stats, linearized
from nepenthe.models import mobilenet_v2_cifar, resnet18_cifar, vgg16_bn_cifar

MIXED, OFF, ON, SAT = NeuronState.MIXED, NeuronState.OFF, NeuronState.ON, NeuronState.SAT

FP32_TOL = 1e-5


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


@torch.no_grad()
def randomize_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN in eval with non-trivial statistics and affine parameters (a trained network's BN)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.5)
    return model.eval()


@torch.no_grad()
def fold_and_check(model: nn.Module, x: torch.Tensor, states: dict, *, approximate: bool = False,
                   planner: str = "all", fresh: torch.Tensor | None = None):
    """Fold with forced states and compare with the linearized model on a fresh input."""
    stats = forced_stats(model, x, states)
    folded = fold(model, stats, x, verify=False, planner=planner, approximate=approximate)
    ref_model = linearized(model, stats, approximate=approximate)
    fresh = torch.randn_like(x) if fresh is None else fresh
    assert rel_err(folded(fresh), ref_model(fresh)) <= FP32_TOL
    return folded, stats


# ----- torchvision-style residual blocks (written here; the real torchvision models are tested
# ----- at the end when torchvision is installed) --------------------------------------------------
class TVBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)  # shared: called twice, two call sites
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * self.expansion, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * self.expansion))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, block, widths=(8, 8, 16), strides=(1, 1, 2)):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0] * getattr(block, "expansion", 1), 3, padding=1)
        inplanes = widths[0] * getattr(block, "expansion", 1)
        blocks = []
        for w, s in zip(widths[1:], strides[1:]):
            blocks.append(block(inplanes, w, s))
            inplanes = w * getattr(block, "expansion", 1)
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


@pytest.mark.parametrize("size", [7, 8])
def test_torchvision_style_basic_blocks_with_shared_inplace_relu(size):
    torch.manual_seed(0)
    model = randomize_bn_(TinyResNet(TVBasicBlock))
    x = torch.randn(3, 3, size, size)
    sites = sorted(forced_stats(model, x).histogram)
    assert sites == ["blocks.0.relu", "blocks.0.relu#1", "blocks.1.relu", "blocks.1.relu#1"]
    # inner activations gone in both blocks; the post-addition one too in the first block
    folded, _ = fold_and_check(model, x, {"blocks.0.relu": "on", "blocks.0.relu#1": "on", "blocks.1.relu": "on"})
    report = folded.fold_report
    assert report.rectifier_layers_removed == 3
    assert report.critical_path_after < report.critical_path_before
    assert report.flops_before > 0 and report.flops_after > 0


def test_torchvision_style_bottleneck_with_relus_off_and_on():
    torch.manual_seed(1)
    model = randomize_bn_(TinyResNet(TVBottleneck, widths=(4, 4, 8), strides=(1, 1, 2)))
    x = torch.randn(2, 3, 9, 9)
    codes = torch.tensor([0, 1, 0, 0])  # one always-OFF neuron in the first inner ReLU
    folded, _ = fold_and_check(model, x, {"blocks.0.relu": codes, "blocks.0.relu#1": "on", "blocks.1.relu#1": "on"})
    assert folded.fold_report.rectifier_layers_removed == 3
    assert "blocks.0.conv2 + blocks.0.conv3" in folded.fold_report.merges  # 3×3 then 1×1: exact composed kernel


# ----- MobileNetV2, VGG -------------------------------------------------------------------------------
def test_mobilenet_v2_inverted_residuals_with_relu6_kinks():
    torch.manual_seed(2)
    model = randomize_bn_(mobilenet_v2_cifar(num_classes=4))
    x = torch.randn(2, 3, 16, 16)
    sites = sorted(forced_stats(model, x).histogram)
    assert len(sites) == 35
    states = {"features.2.expand.act": "on", "features.2.depthwise.act": "on",  # a whole block becomes linear
              "features.4.expand.act": "sat", "features.4.depthwise.act": "on"}  # the upper kink: a constant
    # saturated neurons among linear ones (ReLU6 above its upper kink: a constant 6)
    states["features.3.expand.act"] = torch.where(torch.arange(144) % 3 == 0, 2, 0)
    folded, stats = fold_and_check(model, x, states)
    report = folded.fold_report
    assert report.rectifier_layers_removed == 5
    assert sorted(report.removed) == sorted(states)
    # planner "all": the depthwise conv merged with its neighbours is dense (more FLOPs; the latency
    # planner would decide), but it is exact, borders included
    assert report.ops_merged >= 1


def test_vgg16_bn_alternate_relus_linear():
    torch.manual_seed(3)
    model = randomize_bn_(vgg16_bn_cifar(num_classes=4))
    x = torch.randn(2, 3, 32, 32)
    sites = list(forced_stats(model, x).histogram)
    assert len(sites) == 15
    states = {name: "on" for name in sites[6:13:2]}
    folded, _ = fold_and_check(model, x, states)
    assert folded.fold_report.rectifier_layers_removed == len(states)


# ----- transformer MLPs -----------------------------------------------------------------------------------
class MLPBlock(nn.Module):
    """``x + fc2(drop(gelu(fc1(norm(x)))))`` (pre-norm optional, residual optional)."""

    def __init__(self, dim=16, hidden=64, residual=True, prenorm=False):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if prenorm else nn.Identity()
        self.fc1, self.act, self.drop = nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.1)
        self.fc2 = nn.Linear(hidden, dim)
        self.residual = residual

    def forward(self, x):
        y = self.fc2(self.drop(self.act(self.fc1(self.norm(x)))))
        return x + y if self.residual else y


@pytest.mark.parametrize("residual", [False, True])
def test_transformer_mlp_folds_to_one_linear_and_reports_gelu_error(residual):
    torch.manual_seed(4)
    block = MLPBlock(residual=residual).eval()
    x = torch.randn(2, 7, 16)
    stats = forced_stats(block, x, {"act": "on"})
    plain = fold(block, stats, x, verify=False, planner="all")
    assert plain.fold_report.rectifier_layers_removed == 0  # GELU is only approximately linear
    assert any("approximate=True" in s["reason"] for s in plain.fold_report.skipped)
    folded, _ = fold_and_check(block, x, {"act": "on"}, approximate=True)
    report = folded.fold_report
    linears = [m for m in folded.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and report.approximated == ["act"]
    assert ("skip + fc2" in report.merges) == residual
    assert not any(n.op == "call_function" for n in folded.graph.nodes)  # the residual went into the weights
    err = report.approximation_error["act"]
    with torch.no_grad():
        z = block.fc1(x).double()
    expected = (torch.nn.functional.gelu(z) - z).abs()
    assert err["max_abs"] == pytest.approx(float(expected.max()), rel=1e-6)
    assert err["mean_abs"] == pytest.approx(float(expected.mean()), rel=1e-6)


def test_prenorm_transformer_mlp_keeps_the_residual_and_norm():
    block = MLPBlock(prenorm=True).eval()
    x = torch.randn(2, 5, 16)
    folded, _ = fold_and_check(block, x, {"act": "on"}, approximate=True)
    assert sum(isinstance(m, nn.Linear) for m in folded.modules()) == 1
    assert any(isinstance(m, nn.LayerNorm) for m in folded.modules())
    assert sum(1 for n in folded.graph.nodes if n.op == "call_function") == 1  # x + L(norm(x))


# ----- emptied convs ------------------------------------------------------------------------------------
EMPTIED_BLOCKS = ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]


def emptied_resnet18():
    torch.manual_seed(5)
    model = randomize_bn_(resnet18_cifar(num_classes=10))
    empty_layers(model, [f"{b}.conv{i}" for b in EMPTIED_BLOCKS for i in (1, 2)])
    return model


def test_resnet18_emptied_blocks_are_deleted_exactly():
    model = emptied_resnet18()
    x = torch.randn(2, 3, 32, 32)
    folded, _ = fold_and_check(model, x, {f"{b}.relu1": "on" for b in EMPTIED_BLOCKS})
    report = folded.fold_report
    assert sorted(report.ops_deleted) == sorted(f"{b}.conv{i}" for b in EMPTIED_BLOCKS for i in (1, 2))
    assert not any(isinstance(m, nn.Conv2d) and not bool(m.weight.any()) for m in folded.modules())
    # each emptied block leaves relu(x + c): one per-channel offset added to its input (no expanded constant)
    assert sum(isinstance(m, (ConstantChannels, ChannelOffset)) for m in folded.modules()) == len(EMPTIED_BLOCKS)
    assert sum(isinstance(m, ChannelOffset) for m in folded.modules()) == len(EMPTIED_BLOCKS)
    # half of the blocks' convs gone: the FLOPs of those convs are gone too
    assert report.flops_after < 0.6 * report.flops_before
    exported = torch.export.export(folded, (x,))
    assert rel_err(exported.module()(x), folded(x)) <= FP32_TOL


def test_emptied_conv_feeding_a_padded_conv_stays_exact():
    """Only conv1 emptied: its constant reaches a zero-padded conv2, whose output is NOT constant at
    the borders; the constant stays a (cheap, expanded) input there."""
    torch.manual_seed(6)
    model = randomize_bn_(TinyResNet(TVBasicBlock))
    empty_layers(model, ["blocks.0.conv1"])
    x = torch.randn(2, 3, 6, 6)
    folded, _ = fold_and_check(model, x, {})
    assert folded.fold_report.ops_deleted == ["blocks.0.conv1"]


def test_inplace_add_into_a_constant_is_rewritten():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            out = self.conv(x)
            out += x  # into an expanded constant this would fail
            return torch.relu(out)

    model = Block().eval()
    empty_layers(model, ["conv"])
    x = torch.randn(2, 4, 5, 5)
    folded, _ = fold_and_check(model, x, {})
    assert folded.fold_report.ops_deleted == ["conv"]


# ----- the planner ------------------------------------------------------------------------------------------
def test_planner_returns_the_original_model_when_nothing_folds():
    torch.manual_seed(7)
    model = MLPBlock(residual=False).eval()
    x = torch.randn(4, 16)
    stats = forced_stats(model, x)  # every site mixed: nothing to fold
    out = fold(model, stats, x)
    assert out.fold_report.returned == "original" and isinstance(out, MLPBlock)
    assert out is not model and torch.equal(out(x), model(x))
    assert out.fold_report.planner["model_ms"] is None  # nothing removed: not even timed


def test_planner_times_each_candidate_and_the_whole_model():
    torch.manual_seed(8)
    block = MLPBlock(dim=64, hidden=256).eval()
    x = torch.randn(8, 64)
    stats = forced_stats(block, x, {"act": "on"})
    out = fold(block, stats, x, approximate=True, planner="latency", latency_input=torch.randn(64, 64))
    report = out.fold_report
    plan = report.planner
    assert plan["mode"] == "latency" and plan["latency_input_shape"] == [[64, 64]]
    keys = [d["candidate"] for d in plan["decisions"]]
    assert keys[0] == "fc1 + fc2"
    for d in plan["decisions"]:
        assert d["shape"][0] == 64
        if d["by"] in ("timing", "cache"):  # merged only when the whole interval is below 1 - margin
            assert d["merged"] == (d["verdict"] == "faster") and (not d["merged"] or d["high"] < 1.0)
    # one 64x64 Linear instead of 64x256 + 256x64: fewer FLOPs, merged without timing
    assert plan["decisions"][0]["merged"] and plan["decisions"][0]["by"] == "flops"
    assert plan["decided_by_flops"] == len(plan["decisions"]) and plan["decided_by_timing"] == 0
    assert set(plan["model_ms"]) >= {"unfolded", "folded", "ratio"}
    assert plan["whole_model"][0]["model"] == "folded"
    # 8x fewer FLOPs: clearly faster, or kept by the FLOP rule when the timing is inconclusive
    assert report.returned == "folded" and report.ops_merged == len(plan["decisions"]) and report.discarded == {}
    assert plan["seconds"] > 0 and report.seconds >= plan["seconds"]


def test_planner_none_only_drops_activations():
    block = MLPBlock().eval()
    x = torch.randn(2, 3, 16)
    folded, _ = fold_and_check(block, x, {"act": "on"}, approximate=True, planner="none")
    assert folded.fold_report.ops_merged == 0
    assert sum(isinstance(m, nn.Linear) for m in folded.modules()) == 2
    with pytest.raises(ValueError, match="planner must be one of"):
        fold(block, forced_stats(block, x), x, planner="fastest")


def test_strict_mode_names_the_blocked_node():
    class Dilated(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = nn.Conv2d(2, 2, 3, dilation=2), nn.ReLU(), nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.b(self.act(self.a(x)))

    model = Dilated().eval()
    x = torch.randn(1, 2, 9, 9)
    folded, _ = fold_and_check(model, x, {"act": "on"})
    assert any(s["node"] == "a -> b" for s in folded.fold_report.skipped)  # merges not done are only reported
    gelu = MLPBlock().eval()
    with pytest.raises(FoldError, match="'act'"):
        fold(gelu, forced_stats(gelu, torch.randn(2, 16), {"act": "on"}), torch.randn(2, 16), strict=True,
             planner="all")


# ----- the real torchvision models (tests/conftest.py: torchvision_models) ---------------------------------
TORCHVISION = [("resnet18", 32), ("mobilenet_v2", 32), ("vgg16_bn", 32), ("swin_t", 64)]


def costly_merge(model_name: str, site: str) -> bool:
    """VGG's classifier ReLU: removing it merges Linear(25088, 4096) with Linear(4096, 4096), 4e11
    float64 multiply-adds (20 s on CI's 2 cores) that test nothing the conv sites do not."""
    return model_name == "vgg16_bn" and site.startswith("classifier")


@pytest.mark.parametrize("name, size", TORCHVISION)
def test_torchvision_models(torchvision_models, tmp_path, name, size):
    """Unmodified torchvision models: every third rectifier forced ON folds exactly, and the folded
    model saves and loads (swin_t keeps torchvision's fx-wrapped attention functions: from the original)."""
    build = functools.partial(getattr(torchvision_models, name), weights=None, num_classes=10)
    torch.manual_seed(9)
    model = randomize_bn_(build())
    x = torch.randn(1, 3, size, size)
    sites = [s for s in forced_stats(model, x).histogram if not costly_merge(name, s)]
    states = {s: "on" for s in sites[1::3]}
    folded, _ = fold_and_check(model, x, states, approximate=name == "swin_t")
    assert folded.fold_report.rectifier_layers_removed == len(states)
    save(folded, tmp_path, original=model)
    with torch.no_grad():
        assert torch.equal(load(tmp_path, original=build)(x), folded(x))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vgg16_bn"])
def test_torchvision_convnets_with_emptied_convs_and_per_neuron_states(torchvision_models, name):
    """A third of the convs emptied and every call site in a random state, per neuron for some
    (ON / OFF / mixed, and saturated for ReLU6): folded == linearized on a fresh input."""
    rng = random.Random(name)
    torch.manual_seed(rng.randrange(2**16))
    model = randomize_bn_(getattr(torchvision_models, name)(weights=None, num_classes=10))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    empty_layers(model, rng.sample(convs, len(convs) // 3))
    x = torch.randn(2, 3, 32, 32)
    measured = forced_stats(model, x)
    states = {}
    for site, hist in measured.histogram.items():
        if costly_merge(name, site):
            continue
        codes = [ON, OFF, MIXED] + ([SAT] if measured.sites[site].rectifier.upper is not None else [])
        states[site] = rng.choice([*("on", "off", "mixed"),
                                   torch.tensor([rng.choice(codes) for _ in range(hist.shape[0])])])
    folded, _ = fold_and_check(model, x, states)
    assert folded.fold_report.ops_deleted
