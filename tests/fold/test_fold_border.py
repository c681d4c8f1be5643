"""Tests for nepenthe.fold.border: merging two convs when the second one zero-pads.

Every merged module is compared with running ``second(first(x))``: in float64 the two agree to
≤ 1e-10 (max|Δ| / max|ref|); a float32 merge stays within the SPEC §4 bound 1e-5 of the float64
reference. Random pairs cover Conv1d/Conv2d, kernels 1–5, strides 1–3, paddings 0–3 (different per
dim in 2d), grouped and depthwise convs, with and without biases, and input sizes from the smallest
valid one (the border covers everything) up, including sizes not divisible by the strides.
"""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from nepenthe.fold.algebra import merge_conv_conv
from nepenthe.fold.border import merge_padded, merge_padded_blocker
from nepenthe.fold.modules import BorderCorrectedConv

FP64_TOL = 1e-10
FP32_TOL = 1e-5
# derandomized: the same examples on every run (CI must not turn red on a fresh random draw)
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs (tests/conftest.py)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out − ref| / max|ref| in float64 (absolute when the reference is ~0: a border-only output
    made of the second conv's missing bias)."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).abs().max() / max(float(ref.abs().max()), 1e-3))


def conv(dims: int, *args, **kwargs) -> nn.Conv1d | nn.Conv2d:
    return (nn.Conv1d if dims == 1 else nn.Conv2d)(*args, **kwargs)


def min_size(first, second, d: int) -> int:
    """The smallest input size along dim d for which both convs have an output."""
    k1, s1, p1 = first.kernel_size[d], first.stride[d], first.padding[d]
    k2, p2 = second.kernel_size[d], second.padding[d]
    return max(1, k1 - 2 * p1, (k2 - 2 * p2 - 1) * s1 + k1 - 2 * p1)


@st.composite
def conv_pairs(draw, dtype=torch.float64):
    """(first, second, x): a random valid pair and an input with at least one output position."""
    dims = draw(st.sampled_from([1, 2]))
    if draw(st.booleans()) and draw(st.booleans()):          # depthwise ∘ depthwise (maybe with a multiplier)
        c = draw(st.integers(1, 4))
        mult = draw(st.integers(1, 2))
        c_in, mid, out, g1, g2 = c, c * mult, c * mult, c, c * mult
    else:
        g1, g2 = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        mid = g1 * g2 // math.gcd(g1, g2) * draw(st.integers(1, 2))
        c_in, out = g1 * draw(st.integers(1, 3)), g2 * draw(st.integers(1, 3))

    def geometry():
        ints = lambda lo, hi: st.tuples(*[st.integers(lo, hi)] * dims)  # noqa: E731
        return draw(ints(1, 5)), draw(ints(1, 3)), draw(ints(0, 3))

    k1, s1, p1 = geometry()
    if draw(st.integers(0, 4)) == 0:                          # pointwise first conv (the "bias" mode)
        k1, p1 = (1,) * dims, (0,) * dims
    k2, s2, p2 = geometry()
    torch.manual_seed(draw(st.integers(0, 2**16)))
    first = conv(dims, c_in, mid, k1, s1, p1, groups=g1, bias=draw(st.booleans()), dtype=dtype)
    second = conv(dims, mid, out, k2, s2, p2, groups=g2, bias=draw(st.booleans()), dtype=dtype)
    with torch.no_grad():                                     # biases of the size of the weights' response
        for m in (first, second):
            if m.bias is not None:
                m.bias.normal_()
    size = tuple(min_size(first, second, d) + draw(st.integers(0, 9)) for d in range(dims))
    x = torch.randn((draw(st.integers(1, 2)), c_in) + size, dtype=dtype)
    return first, second, x


def check_pair(first, second, x, tol):
    merged = merge_padded(first, second)
    with torch.no_grad():
        ref = second.double()(first.double()(x.double()))
        out = merged(x)
    assert out.dtype == x.dtype
    err = rel_err(out, ref)
    assert err <= tol, (err, merged)
    return merged


# ----- exactness ------------------------------------------------------------------------------
@settings(max_examples=400, **SETTINGS)
@given(conv_pairs())
def test_exact_in_float64(pair):
    check_pair(*pair, FP64_TOL)


def magnitude(first, second, x) -> float:
    """A bound on the terms a float32 output is summed from: max |first|(|x|) times the largest
    Σ|weight| of one output channel of the second conv, plus its largest |bias|. Rounding error scales
    with it, not with the result, which may cancel to zero or be all border (the merged conv still
    sums terms of this size there and subtracts a correction)."""
    first = copy.deepcopy(first).double()
    with torch.no_grad():
        for p in first.parameters():
            p.abs_()
        inner = float(first(x.double().abs()).max())
        w2 = second.weight.detach().double().abs().flatten(1).sum(1).max()
        b2 = second.bias.detach().double().abs().max() if second.bias is not None else 0.0
    return inner * float(w2) + float(b2)


@settings(max_examples=100, **SETTINGS)
@given(conv_pairs(dtype=torch.float32))
def test_float32_within_spec_bound(pair):
    first, second, x = pair
    merged = merge_padded(first, second)
    assert merged.weight.dtype == torch.float32
    scale = magnitude(first, second, x)
    with torch.no_grad():
        ref = second.double()(first.double()(x.double()))     # the same weights, in float64
        out = merged(x)
    # the spec's relative 1e-5; where the result cancels (|ref| ≪ its terms) relative to 1 % of the
    # terms' size: an all-zero reference is then not held to an absolute 1e-8
    err = float((out.double() - ref).abs().max()) / max(float(ref.abs().max()), 1e-2 * scale, 1e-30)
    assert err <= FP32_TOL, (err, merged)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("k1,s1,p1,k2,s2,p2", [
    (3, 1, 1, 3, 1, 1),      # ResNet BasicBlock
    (3, 2, 1, 3, 1, 1),      # downsampling block
    (1, 1, 0, 3, 2, 1),      # Bottleneck 1×1 then strided 3×3
    (5, 3, 0, 5, 2, 3),      # wide ring, strides in both
    (4, 2, 3, 1, 3, 3),      # the second conv's windows sit entirely in the ring at the ends
    (2, 3, 0, 4, 3, 2),      # leftover rows: sizes not divisible by the strides
])
@pytest.mark.parametrize("extra", [0, 1, 2, 5])
def test_exact_geometries_small_inputs(dims, k1, s1, p1, k2, s2, p2, extra):
    torch.manual_seed(extra)
    first = conv(dims, 3, 4, k1, s1, p1, dtype=torch.float64)
    second = conv(dims, 4, 2, k2, s2, p2, dtype=torch.float64)
    size = tuple(min_size(first, second, d) + extra + d for d in range(dims))
    check_pair(first, second, torch.randn((2, 3) + size, dtype=torch.float64), FP64_TOL)


def test_asymmetric_paddings_and_string_padding():
    torch.manual_seed(0)
    first = nn.Conv2d(3, 6, (3, 5), stride=(2, 1), padding=(0, 3), dtype=torch.float64)
    second = nn.Conv2d(6, 4, (5, 1), stride=(1, 3), padding=(3, 0), dtype=torch.float64)
    check_pair(first, second, torch.randn(2, 3, 11, 8, dtype=torch.float64), FP64_TOL)
    first = nn.Conv2d(3, 6, 3, padding="same", dtype=torch.float64)
    second = nn.Conv2d(6, 4, (3, 5), padding="same", dtype=torch.float64)
    merged = check_pair(first, second, torch.randn(1, 3, 7, 9, dtype=torch.float64), FP64_TOL)
    assert merged.padding == (2, 3) and merged.kernel_size == (5, 7)
    valid = nn.Conv1d(6, 4, 3, padding="valid", dtype=torch.float64)
    first1 = nn.Conv1d(3, 6, 3, padding=1, dtype=torch.float64)
    assert type(check_pair(first1, valid, torch.randn(1, 3, 9, dtype=torch.float64), FP64_TOL)) is nn.Conv1d


def test_gradients_match():
    torch.manual_seed(0)
    first, second = nn.Conv2d(3, 5, 3, 2, 1, dtype=torch.float64), nn.Conv2d(5, 4, 3, 1, 2, dtype=torch.float64)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, requires_grad=True)
    merge_padded(first, second)(x).square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    second(first(x)).square().sum().backward()
    assert torch.allclose(grad, x.grad, rtol=1e-10, atol=1e-12)


# ----- which module comes back ---------------------------------------------------------------
def test_plain_conv_when_no_correction_is_needed():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64)
    # second without padding: exactly algebra.merge_conv_conv
    first, second = nn.Conv2d(4, 6, 3, 2, 1, dtype=torch.float64), nn.Conv2d(6, 5, 3, 1, 0, dtype=torch.float64)
    merged = check_pair(first, second, x, FP64_TOL)
    reference = merge_conv_conv(first, second)
    assert type(merged) is nn.Conv2d and torch.equal(merged.weight, reference.weight)
    assert torch.equal(merged.bias, reference.bias) and merged.padding == reference.padding
    # grouped, second without padding: plain conv with gcd(g1, g2) groups
    first = nn.Conv2d(4, 6, 3, 1, 1, groups=2, dtype=torch.float64)
    second = nn.Conv2d(6, 6, 3, groups=3, dtype=torch.float64)
    merged = check_pair(first, second, x, FP64_TOL)
    assert type(merged) is nn.Conv2d and merged.groups == 1
    # pointwise first without bias: the ring is exactly zero
    first = nn.Conv2d(4, 6, 1, 2, bias=False, dtype=torch.float64)
    second = nn.Conv2d(6, 5, 3, 2, 1, dtype=torch.float64)
    merged = check_pair(first, second, x, FP64_TOL)
    assert type(merged) is nn.Conv2d and merged.padding == (2, 2) and merged.stride == (4, 4)
    # a bias of exact zeros counts as none; k1 ≤ p1 + 1 (a "full" conv) only sees padding on the ring too
    first = nn.Conv1d(4, 6, 3, padding=2, dtype=torch.float64)
    nn.init.zeros_(first.bias)
    merged = check_pair(first, nn.Conv1d(6, 5, 3, padding=1, dtype=torch.float64), x[..., 0], FP64_TOL)
    assert type(merged) is nn.Conv1d


def test_correction_modes_and_depthwise():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 10, dtype=torch.float64)
    pointwise = nn.Conv2d(8, 16, 1, dtype=torch.float64)
    merged = check_pair(pointwise, nn.Conv2d(16, 8, 3, 1, 1, dtype=torch.float64), x, FP64_TOL)
    assert isinstance(merged, BorderCorrectedConv) and merged.mode == "bias"
    assert set(dict(merged.named_buffers())) == {"ring_weight"}
    merged = check_pair(nn.Conv2d(8, 8, 3, 1, 1, groups=8, dtype=torch.float64),
                        nn.Conv2d(8, 8, 3, 2, 1, groups=8, dtype=torch.float64), x, FP64_TOL)
    assert isinstance(merged, BorderCorrectedConv) and merged.mode == "full"
    assert merged.groups == 8 and merged.weight.shape == (8, 1, 5, 5)      # still depthwise
    # MobileNetV2: expand (pointwise) ∘ depthwise, depthwise ∘ project (no padding: plain)
    expand, dw = nn.Conv2d(8, 16, 1, dtype=torch.float64), nn.Conv2d(16, 16, 3, 2, 1, groups=16, dtype=torch.float64)
    assert check_pair(expand, dw, x, FP64_TOL).mode == "bias"
    assert type(check_pair(dw, nn.Conv2d(16, 8, 1, dtype=torch.float64), x.repeat(1, 2, 1, 1), FP64_TOL)) is nn.Conv2d


def test_conv_attributes():
    first, second = nn.Conv2d(4, 6, (3, 1), (2, 1), (1, 0)), nn.Conv2d(6, 5, (3, 5), (1, 2), (1, 2), bias=False)
    merged = merge_padded(first, second)
    assert isinstance(merged, BorderCorrectedConv)
    assert merged.in_channels == 4 and merged.out_channels == 5 and merged.groups == 1
    assert merged.kernel_size == (7, 5) and merged.stride == (2, 2) and merged.padding == (3, 2)
    assert merged.weight.shape == (5, 4, 7, 5) and merged.bias.shape == (5,)
    assert merged.dilation == (1, 1) and merged.padding_mode == "zeros"
    assert isinstance(merged.weight, nn.Parameter) and isinstance(merged.bias, nn.Parameter)


# ----- dtypes, layouts, export ----------------------------------------------------------------
def _resnet_pair(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Conv2d(16, 16, 3, 1, 1, dtype=dtype), nn.Conv2d(16, 16, 3, 1, 1, dtype=dtype)


@pytest.mark.parametrize("mode_pair", ["full", "bias"])
def test_channels_last(mode_pair):
    first, second = _resnet_pair()
    if mode_pair == "bias":
        first = nn.Conv2d(16, 16, 1, 2)
    merged = merge_padded(first, second)
    x = torch.randn(2, 16, 11, 9).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert rel_err(merged(x), second.double()(first.double()(x.double()))) <= FP32_TOL


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precisions(dtype, tol):
    first, second = _resnet_pair(torch.float64)
    x = torch.randn(2, 16, 11, 9, dtype=torch.float64)
    with torch.no_grad():
        ref = second(first(x))
        merged = merge_padded(first, second).to(dtype)
        assert merged.weight.dtype == dtype
        out = merged(x.to(dtype))
        assert out.dtype == dtype
        two = second.to(dtype)(first.to(dtype)(x.to(dtype)))
    # as accurate as running the two convs in that dtype
    assert rel_err(out, ref) <= max(tol, 2 * rel_err(two, ref))


@pytest.mark.parametrize("which", ["full2d", "bias2d", "full1d"])
def test_torch_export(which):
    torch.manual_seed(0)
    if which == "full2d":
        first, second, x = nn.Conv2d(4, 6, 3, 2, 1), nn.Conv2d(6, 5, 3, 1, 2), torch.randn(2, 4, 11, 8)
    elif which == "bias2d":
        first, second, x = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 5, 3, 2, 1), torch.randn(2, 4, 9, 8)
    else:
        first, second, x = nn.Conv1d(4, 6, 5, 3), nn.Conv1d(6, 5, 2, 2, 3), torch.randn(2, 4, 17)
    merged = merge_padded(first, second).eval()
    assert isinstance(merged, BorderCorrectedConv)
    program = torch.export.export(merged, (x,))
    with torch.no_grad():
        assert rel_err(program.module()(x), second(first(x))) <= FP32_TOL


def test_torch_compile_fullgraph():
    first, second = nn.Conv2d(4, 6, 3, 2, 1), nn.Conv2d(6, 5, 3, 1, 1)
    merged = merge_padded(first, second)
    x = torch.randn(2, 4, 9, 10)
    compiled = torch.compile(merged, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert rel_err(compiled(x), second(first(x))) <= FP32_TOL


# ----- recipe -----------------------------------------------------------------------------------
@pytest.mark.parametrize("pair", [
    lambda: (nn.Conv2d(4, 6, 3, 2, 1), nn.Conv2d(6, 5, 3, 1, 1, groups=1)),
    lambda: (nn.Conv2d(4, 8, 3, 1, 1, groups=4), nn.Conv2d(8, 8, 3, 1, 1, groups=8)),
    lambda: (nn.Conv1d(4, 6, 1), nn.Conv1d(6, 5, 3, 2, 2)),
])
def test_recipe_kwargs_round_trip(pair):
    first, second = pair()
    merged = merge_padded(first, second)
    kwargs = json.loads(json.dumps(merged.recipe_kwargs()))
    empty = BorderCorrectedConv.from_recipe_kwargs(kwargs)
    assert {k: v.shape for k, v in empty.state_dict().items()} == {k: v.shape for k, v in merged.state_dict().items()}
    empty.load_state_dict(merged.state_dict(), strict=True)
    x = torch.randn((2, first.in_channels) + (9,) * (first.weight.dim() - 2))
    with torch.no_grad():
        assert torch.equal(empty(x), merged(x))
    assert empty.recipe_kwargs() == kwargs


# ----- cost -------------------------------------------------------------------------------------
def _flops(fn, *args) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args)
    return counter.get_total_flops()


def _correction_flops(merged, x) -> int:
    composed = _flops(lambda t: nn.functional.conv2d(t, merged.weight, merged.bias, merged.stride, merged.padding,
                                                     1, merged.groups), x)
    return _flops(merged, x) - composed


def test_correction_cost_grows_with_the_perimeter():
    first, second = _resnet_pair()
    merged = merge_padded(first, second)
    small, large = (_correction_flops(merged, torch.randn(1, 16, n, n)) for n in (16, 64))
    assert 0 < small and large < 4.5 * small                 # 4× the side: ~4× (not 16×) the work
    # ResNet 3×3∘3×3, 16×16: first conv on 68 ring positions, second on 64 outputs with 3 of 9 taps
    assert small == 2 * 16 * 16 * (68 * 9 + 64 * 3)


def test_bias_mode_correction_is_batch_independent():
    merged = merge_padded(nn.Conv2d(8, 16, 1), nn.Conv2d(16, 8, 3, 1, 1))
    one, many = (_correction_flops(merged, torch.randn(n, 8, 12, 12)) for n in (1, 8))
    assert one == many > 0


# ----- refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("first,second,message", [
    (nn.Conv2d(3, 4, 3, dilation=2), nn.Conv2d(4, 4, 3, padding=1), "dilat"),
    (nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
    (nn.Conv1d(3, 4, 3), nn.Conv2d(4, 4, 3, padding=1), "dimensions differ"),
    (nn.Conv2d(3, 4, 3), nn.Conv2d(5, 4, 3, padding=1), "output channels"),
    (nn.Linear(3, 4), nn.Conv2d(4, 4, 3), "Conv1d/nn.Conv2d pairs only"),
    (nn.Conv3d(3, 4, 3), nn.Conv3d(4, 4, 3), "Conv1d/nn.Conv2d pairs only"),
    (nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 2, padding="same"), "even kernel"),
])
def test_unsupported_pairs_raise(first, second, message):
    assert message in merge_padded_blocker(first, second)
    with pytest.raises(ValueError, match=re.escape(message)):
        merge_padded(first, second)
