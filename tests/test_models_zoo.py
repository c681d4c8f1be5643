"""Model zoo: shapes, rectifier call sites, FX traceability, channels_last and parameter counts.

The rectifier counts are the "Rem." denominators of the papers (17 / 35 / 15); they are counted the
way the entropy code will see them: one forward pre-hook per activation module.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from nepenthe.models.cnn import SmallCNN
from nepenthe.models.mobilenet_v2 import mobilenet_v2_cifar
from nepenthe.models.resnet import resnet18_cifar
from nepenthe.models.vgg import vgg16_bn_cifar

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardtanh)

# name -> (constructor, input shape (batch 2), expected rectifier count or None for ">= 4")
MODELS = {
    "resnet18_cifar": (resnet18_cifar, (2, 3, 32, 32), 17),
    "mobilenet_v2_cifar": (mobilenet_v2_cifar, (2, 3, 32, 32), 35),
    "vgg16_bn_cifar": (vgg16_bn_cifar, (2, 3, 32, 32), 15),
    "small_cnn_8": (lambda: SmallCNN(input_size=8), (2, 1, 8, 8), None),
    "small_cnn_28": (lambda: SmallCNN(input_size=28), (2, 1, 28, 28), None),
}

# Parameter counts for 10 classes: (low, high).
PARAM_RANGES = {
    "resnet18_cifar": (11_160_000, 11_180_000),  # 11,173,962
    "mobilenet_v2_cifar": (2_200_000, 2_300_000),  # 2,236,682
    "vgg16_bn_cifar": (14_700_000, 15_300_000),  # 15,249,354
    "small_cnn_8": (10_000, 1_000_000),
    "small_cnn_28": (10_000, 1_000_000),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    """(name, eval-mode model, fixed input) built once per model for the whole module."""
    torch.manual_seed(0)
    build, shape, _ = MODELS[request.param]
    model = build().eval()
    x = torch.randn(shape)
    return request.param, model, x


def _activation_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ACTIVATIONS)}


def _call_counts(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    counts = dict.fromkeys(_activation_modules(model), 0)
    handles = []
    for name, m in _activation_modules(model).items():

        def hook(_module, _inputs, name=name):
            counts[name] += 1

        handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return counts


def test_forward_shape(case):
    _, model, x = case
    with torch.no_grad():
        assert model(x).shape == (2, 10)


def test_rectifier_call_sites(case):
    name, model, x = case
    counts = _call_counts(model, x)
    expected = MODELS[name][2]
    total = sum(counts.values())
    if expected is None:
        assert total >= 4
    else:
        assert total == expected
    # Every activation module is a separate call site: registered modules are each used exactly once.
    assert all(c == 1 for c in counts.values()), {k: c for k, c in counts.items() if c != 1}
    # named_modules() deduplicates shared instances; make sure no instance is registered twice.
    all_acts = [m for m in model.modules() if isinstance(m, ACTIVATIONS)]
    assert len({id(m) for m in all_acts}) == len(counts)


def test_activations_not_inplace(case):
    _, model, _ = case
    for name, m in _activation_modules(model).items():
        assert not getattr(m, "inplace", False), name


def test_no_functional_rectifiers(case):
    """All rectifiers are modules, so hooks see them: the FX graph has no relu/relu6 function calls."""
    _, model, _ = case
    graph = torch.fx.symbolic_trace(model).graph
    functional = [
        n for n in graph.nodes if n.op in ("call_function", "call_method") and "relu" in str(n.target).lower()
    ]
    assert functional == []


def test_fx_trace_matches_eager(case):
    _, model, x = case
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


def test_channels_last_matches(case):
    _, model, x = case
    with torch.no_grad():
        ref = model(x)
        out_input_only = model(x.contiguous(memory_format=torch.channels_last))
        model_cl = model.to(memory_format=torch.channels_last)
        try:
            out_both = model_cl(x.contiguous(memory_format=torch.channels_last))
        finally:
            model.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(out_input_only, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_both, ref, rtol=0, atol=1e-5)


def test_parameter_count(case):
    name, model, _ = case
    n = sum(p.numel() for p in model.parameters())
    low, high = PARAM_RANGES[name]
    assert low <= n <= high, n


def test_resnet_block_structure():
    model = resnet18_cifar()
    assert isinstance(model.maxpool, nn.MaxPool2d)  # kept, as in the EGP/EASIER CIFAR ResNet-18
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    for stage, stride in zip((model.layer1, model.layer2, model.layer3, model.layer4), (1, 2, 2, 2)):
        first = stage[0]
        assert first.conv1.stride == (stride, stride)
        assert (first.downsample is not None) == (stride != 1)
        assert first.relu1 is not first.relu2


def test_small_cnn_has_unpadded_1x1_after_relu():
    model = SmallCNN(input_size=8)
    children = list(model.features.named_children())
    names = [n for n, _ in children]
    i = names.index("conv2")
    conv = dict(children)["conv2"]
    assert conv.kernel_size == (1, 1) and conv.padding == (0, 0)
    assert isinstance(children[i - 1][1], nn.ReLU)


def test_small_cnn_rejects_tiny_input():
    with pytest.raises(ValueError):
        SmallCNN(input_size=3)


def test_constructor_options():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32)
    assert resnet18_cifar(num_classes=7, in_channels=1).eval()(x).shape == (2, 7)
    assert vgg16_bn_cifar(num_classes=7, in_channels=1).eval()(x).shape == (2, 7)
    half = mobilenet_v2_cifar(num_classes=7, in_channels=1, width_mult=0.5).eval()
    assert half(x).shape == (2, 7)
    assert sum(_call_counts(half, x).values()) == 35
    assert SmallCNN(in_channels=3, num_classes=7, input_size=28, width=8).eval()(
        torch.randn(2, 3, 28, 28)
    ).shape == (2, 7)
