"""Tests for nepenthe.fold.algebra: every exact merge against running the unmerged modules.

Each merged module is compared with the composition of the original modules. In float64 the two
must agree to ~1e-12 (the algebra itself is exact); in float32 the merged module must stay within
the SPEC §4 bound, max|Δ| / max|ref| ≤ 1e-5, of the float64 reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from nepenthe.fold.algebra import (
    absorb_constant_inputs_,
    add_identity,
    compose_kernels64,
    conv_merge_blocker,
    identity_blocker,
    is_foldable,
    is_plain_conv,
    merge_conv_conv,
    merge_linear_linear,
    scale_output_channels_,
    select_input_channels,
    select_output_channels,
)
from nepenthe.fold.modules import ChannelAffine

FP32_TOL = 1e-5
FP64_TOL = 1e-12
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref| in float64 (the SPEC §4 exactness measure)."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out, ref = out.detach().double(), ref.detach().double()
    diff = (out - ref).abs().max()
    scale = ref.abs().max()
    return float(diff / scale) if scale > 0 else float(diff)


def randomize_(m: nn.Module, seed: int) -> nn.Module:
    """Weights and biases of order 1 (default inits are tiny for big fan-ins; we want real signals)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return m


def randn(*shape, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def check_both_precisions(build, run_ref, run_merged, x64: torch.Tensor) -> None:
    """``build(dtype)`` -> modules; ``run_ref(mods, x)`` and ``run_merged(mods, x)`` -> outputs.

    The reference is always the float64 composition of the original modules.
    """
    mods64 = build(torch.float64)
    ref = run_ref(mods64, x64)
    assert rel_err(run_merged(mods64, x64), ref) <= FP64_TOL
    mods32 = build(torch.float32)
    out32 = run_merged(mods32, x64.float())
    assert out32.dtype == torch.float32
    assert rel_err(out32, ref) <= FP32_TOL


# --------------------------------------------------------------------------------------------------
# Linear ∘ Linear
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias1, bias2", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("dims", [(5, 7, 3), (16, 4, 16), (1, 9, 1)])
def test_merge_linear_linear_equals_composition(bias1, bias2, dims):
    a, b, c = dims

    def build(dtype):
        first = randomize_(nn.Linear(a, b, bias=bias1, dtype=dtype), 1)
        second = randomize_(nn.Linear(b, c, bias=bias2, dtype=dtype), 2)
        return first, second, merge_linear_linear(first, second)

    x = randn(6, 3, a, seed=3)  # extra token dim: Linear acts on the last dim only
    check_both_precisions(build, lambda m, x: m[1](m[0](x)), lambda m, x: m[2](x), x)
    first, second, merged = build(torch.float32)
    assert (merged.in_features, merged.out_features) == (a, c)
    assert merged.bias is not None and merged.weight.dtype == torch.float32
    # the inputs are not modified
    assert first.weight.shape == (b, a) and second.weight.shape == (c, b)


def test_merge_linear_linear_chain_of_many_stays_exact():
    layers = [randomize_(nn.Linear(8, 8), s) for s in range(6)]
    with torch.no_grad():
        for m in layers:
            m.weight.mul_(0.3)
    x = randn(10, 8, seed=7, dtype=torch.float32)
    ref = x.double()
    merged = layers[0]
    for m in layers:
        ref = F.linear(ref, m.weight.double(), m.bias.double())
    for m in layers[1:]:
        merged = merge_linear_linear(merged, m)
    assert rel_err(merged(x), ref) <= FP32_TOL


# --------------------------------------------------------------------------------------------------
# Conv ∘ Conv: the full composed kernel
# --------------------------------------------------------------------------------------------------

KERNELS = st.sampled_from([1, 2, 3, 5])
STRIDES = st.sampled_from([1, 2, 3])
PADDINGS = st.sampled_from([0, 1, 2])


def _out_size(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


@SETTINGS
@given(
    k1=st.tuples(KERNELS, KERNELS), k2=st.tuples(KERNELS, KERNELS),
    s1=st.tuples(STRIDES, STRIDES), s2=st.tuples(STRIDES, STRIDES),
    p1=st.tuples(PADDINGS, PADDINGS),
    size=st.sampled_from([(7, 9), (11, 5), (9, 13), (13, 7)]),
    channels=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3)),
    bias1=st.booleans(), bias2=st.booleans(), seed=st.integers(0, 2**16),
)
@example(k1=(5, 2), k2=(5, 3), s1=(3, 2), s2=(2, 3), p1=(2, 0), size=(13, 7), channels=(2, 3, 2), bias1=True,
         bias2=True, seed=0)  # widest kernels, largest strides, asymmetric everything
def test_merge_conv2d_conv2d_equals_composition(k1, k2, s1, s2, p1, size, channels, bias1, bias2, seed):
    n1 = [_out_size(n, k, s, p) for n, k, s, p in zip(size, k1, s1, p1, strict=True)]
    assume(all(a >= k for a, k in zip(n1, k2, strict=True)))  # the second conv needs an input at least its kernel
    cin, cmid, cout = channels

    def build(dtype):
        first = randomize_(nn.Conv2d(cin, cmid, k1, stride=s1, padding=p1, bias=bias1, dtype=dtype), seed)
        second = randomize_(nn.Conv2d(cmid, cout, k2, stride=s2, padding=0, bias=bias2, dtype=dtype), seed + 1)
        assert conv_merge_blocker(first, second) is None
        return first, second, merge_conv_conv(first, second)

    x = randn(2, cin, *size, seed=seed + 2)
    check_both_precisions(build, lambda m, x: m[1](m[0](x)), lambda m, x: m[2](x), x)
    _, _, merged = build(torch.float32)
    # SPEC §4: kernel k1 + s1·(k2 − 1) wide, strides multiplied, the first conv's padding
    assert merged.kernel_size == tuple(a + s * (b - 1) for a, b, s in zip(k1, k2, s1, strict=True))
    assert merged.stride == tuple(a * b for a, b in zip(s1, s2, strict=True))
    assert merged.padding == p1
    assert (merged.in_channels, merged.out_channels) == (cin, cout)


@SETTINGS
@given(
    k1=KERNELS, k2=KERNELS, s1=STRIDES, s2=STRIDES, p1=PADDINGS,
    length=st.sampled_from([7, 9, 11, 13, 17]),
    bias1=st.booleans(), bias2=st.booleans(), seed=st.integers(0, 2**16),
)
def test_merge_conv1d_conv1d_equals_composition(k1, k2, s1, s2, p1, length, bias1, bias2, seed):
    assume(_out_size(length, k1, s1, p1) >= k2)

    def build(dtype):
        first = randomize_(nn.Conv1d(3, 4, k1, stride=s1, padding=p1, bias=bias1, dtype=dtype), seed)
        second = randomize_(nn.Conv1d(4, 2, k2, stride=s2, padding=0, bias=bias2, dtype=dtype), seed + 1)
        return first, second, merge_conv_conv(first, second)

    x = randn(3, 3, length, seed=seed + 2)
    check_both_precisions(build, lambda m, x: m[1](m[0](x)), lambda m, x: m[2](x), x)
    _, _, merged = build(torch.float32)
    assert isinstance(merged, nn.Conv1d)
    assert merged.kernel_size == (k1 + s1 * (k2 - 1),)


@SETTINGS
@given(dims=st.sampled_from([1, 2]), groups=st.integers(1, 3), n=st.integers(1, 4), m_per=st.integers(1, 3),
       c_per=st.integers(1, 3), data=st.data())
def test_compose_kernels64_equals_the_transposed_conv(dims, groups, n, m_per, c_per, data):
    """The matmul-per-tap composition against PyTorch's own float64 transposed convolution."""
    sizes = st.tuples(*[st.integers(1, 5)] * dims)
    k2, k1, stride = data.draw(sizes), data.draw(sizes), data.draw(st.tuples(*[st.integers(1, 3)] * dims))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    w2 = torch.randn((n, groups * m_per) + k2, dtype=torch.float64)
    w1 = torch.randn((groups * m_per, c_per) + k1, dtype=torch.float64)
    transpose = F.conv_transpose1d if dims == 1 else F.conv_transpose2d
    ref = transpose(w2, w1, stride=stride, groups=groups)
    assert rel_err(compose_kernels64(w2, w1, stride, groups=groups), ref) <= FP64_TOL


def test_merge_conv_conv_three_in_a_row():
    convs = [
        randomize_(nn.Conv2d(2, 3, 3, padding=1), 0),
        randomize_(nn.Conv2d(3, 3, 1), 1),
        randomize_(nn.Conv2d(3, 2, 3, stride=2), 2),
    ]
    x = randn(2, 2, 11, 9, seed=5, dtype=torch.float32)
    with torch.no_grad():
        ref = x.double()
        for c in convs:
            ref = F.conv2d(ref, c.weight.double(), c.bias.double(), c.stride, c.padding)
        merged = merge_conv_conv(merge_conv_conv(convs[0], convs[1]), convs[2])
        assert rel_err(merged(x), ref) <= FP32_TOL
    assert merged.kernel_size == (5, 5) and merged.stride == (2, 2) and merged.padding == (1, 1)


def test_conv_merge_blocker_refuses_padded_second_conv():
    first, second = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
    reason = conv_merge_blocker(first, second)
    assert reason is not None and "pad" in reason and "border" in reason
    with pytest.raises(ValueError, match="border"):
        merge_conv_conv(first, second)
    assert conv_merge_blocker(first, nn.Conv2d(3, 4, 3, padding=(0, 1))) is not None


def test_naive_merge_of_padded_second_conv_is_wrong_at_borders_only():
    """Why the blocker exists: the merged kernel sees the first conv's response where the second
    conv sees zero padding, so the border of the output differs; the interior is right."""
    first = randomize_(nn.Conv2d(2, 3, 3, padding=1, dtype=torch.float64), 10)
    second = randomize_(nn.Conv2d(3, 2, 3, padding=1, dtype=torch.float64), 11)
    x = randn(2, 2, 9, 7, seed=12)
    with torch.no_grad():
        ref = second(first(x))
        unpadded = nn.Conv2d(3, 2, 3, padding=0, dtype=torch.float64)
        unpadded.load_state_dict(second.state_dict())
        naive = merge_conv_conv(first, unpadded)  # 5x5 kernel
        naive.padding = (2, 2)  # the "composed" padding p1 + s1·p2 a naive merge would use
        out = naive(x)
    assert out.shape == ref.shape
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert rel_err(out[interior], ref[interior]) <= FP64_TOL
    border = torch.ones(ref.shape[2:], dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert float((out - ref)[..., border].abs().max()) > 1e-3 * float(ref.abs().max())


@pytest.mark.parametrize(
    "first, second, fragment",
    [
        (nn.Conv1d(2, 3, 3), nn.Conv2d(3, 4, 1), "same dimension"),
        (nn.Conv2d(2, 3, 3, dilation=2), nn.Conv2d(3, 4, 1), "dilation"),
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.Conv2d(3, 4, 1), "padding modes"),
        (nn.Conv2d(2, 3, 3, padding="same"), nn.Conv2d(3, 4, 1), "padding modes"),
        (nn.Linear(2, 3), nn.Conv2d(3, 4, 1), "Conv1d/Conv2d"),
    ],
)
def test_conv_merge_blocker_reasons(first, second, fragment):
    reason = conv_merge_blocker(first, second)
    assert reason is not None and fragment in reason
    with pytest.raises(ValueError):
        merge_conv_conv(first, second)


def test_is_plain_conv_and_is_foldable():
    assert is_plain_conv(nn.Conv2d(2, 3, 3, padding=1)) and is_plain_conv(nn.Conv1d(2, 3, 5, stride=2))
    assert is_plain_conv(nn.Conv2d(2, 4, 3, groups=2))  # composed through its dense block-diagonal weight
    assert not is_plain_conv(nn.Conv2d(2, 3, 3, dilation=2))
    assert not is_plain_conv(nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"))
    assert not is_plain_conv(nn.Conv2d(2, 3, 3, padding="same"))
    assert not is_plain_conv(nn.Conv3d(2, 3, 3))
    assert not is_plain_conv(nn.Linear(2, 3))
    assert is_foldable(nn.Linear(2, 3)) and not is_foldable(nn.ReLU()) and not is_foldable(None)


# --------------------------------------------------------------------------------------------------
# x + m(x): identity folded into the weights
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_add_identity_linear(bias):
    def build(dtype):
        m = randomize_(nn.Linear(6, 6, bias=bias, dtype=dtype), 0)
        return m, add_identity(m)

    x = randn(4, 5, 6, seed=1)
    check_both_precisions(build, lambda m, x: x + m[0](x), lambda m, x: m[1](x), x)


@pytest.mark.parametrize(
    "conv_cls, kernel, padding, size",
    [
        (nn.Conv2d, 3, 1, (7, 9)),
        (nn.Conv2d, 1, 0, (11, 5)),
        (nn.Conv2d, 5, 2, (7, 9)),
        (nn.Conv2d, (3, 5), (1, 2), (9, 6)),
        (nn.Conv1d, 3, 1, (13,)),
        (nn.Conv1d, 5, 2, (8,)),
    ],
)
def test_add_identity_conv(conv_cls, kernel, padding, size):
    def build(dtype):
        m = randomize_(conv_cls(4, 4, kernel, padding=padding, dtype=dtype), 2)
        return m, add_identity(m)

    x = randn(2, 4, *size, seed=3)
    check_both_precisions(build, lambda m, x: x + m[0](x), lambda m, x: m[1](x), x)
    m, merged = build(torch.float32)
    assert merged.kernel_size == m.kernel_size and merged.padding == m.padding
    assert m.weight.data_ptr() != merged.weight.data_ptr()  # a copy: the original is untouched


@pytest.mark.parametrize(
    "module, fragment",
    [
        (nn.Linear(4, 5), "width"),
        (nn.Conv2d(4, 5, 3, padding=1), "channels or stride"),
        (nn.Conv2d(4, 4, 3, padding=1, stride=2), "channels or stride"),
        (nn.Conv2d(4, 4, 2, padding=1), "centred"),
        (nn.Conv2d(4, 4, 3, padding=0), "centred"),
        (nn.Conv2d(4, 4, (3, 3), padding=(1, 0)), "centred"),
        (nn.Conv2d(4, 4, 3, padding=1, groups=2), "plain convs"),
        (nn.ReLU(), "plain convs"),
    ],
)
def test_identity_blocker_reasons(module, fragment):
    reason = identity_blocker(module)
    assert reason is not None and fragment in reason
    with pytest.raises(ValueError):
        add_identity(module)


def test_identity_blocker_accepts_foldable_skips():
    assert identity_blocker(nn.Linear(3, 3)) is None
    assert identity_blocker(nn.Conv2d(3, 3, 5, padding=2)) is None
    assert identity_blocker(nn.Conv1d(3, 3, 1)) is None


# --------------------------------------------------------------------------------------------------
# Channel selection, constant inputs, output scaling
# --------------------------------------------------------------------------------------------------

MODULE_CASES = [
    (lambda: nn.Linear(6, 5), (4, 6)),
    (lambda: nn.Conv2d(6, 5, 3), (2, 6, 7, 9)),
    (lambda: nn.Conv2d(6, 5, 3, stride=2, padding=1), (2, 6, 7, 9)),
    (lambda: nn.Conv1d(6, 5, 2, bias=False), (2, 6, 11)),
]


@pytest.mark.parametrize("make, shape", MODULE_CASES)
def test_select_output_channels(make, shape):
    m = randomize_(make(), 0)
    keep = torch.tensor([True, False, True, True, False])
    x = randn(*shape, seed=1, dtype=torch.float32)
    new = select_output_channels(m, keep)
    assert new.weight.shape[0] == 3 and type(new) is type(m)
    dim = -1 if isinstance(m, nn.Linear) else 1
    with torch.no_grad():
        assert rel_err(new(x), m(x).index_select(dim, keep.nonzero().squeeze(1))) <= FP32_TOL
    assert m.weight.shape[0] == 5  # original untouched


@pytest.mark.parametrize("make, shape", MODULE_CASES)
def test_select_input_channels(make, shape):
    m = randomize_(make(), 0)
    keep = torch.tensor([True, True, False, True, False, True])
    dim = -1 if isinstance(m, nn.Linear) else 1
    x = randn(*shape, seed=1, dtype=torch.float32)
    # dropped channels hold zeros: then reading only the kept ones is exact
    mask_shape = [1] * x.dim()
    mask_shape[dim] = -1
    x = x * keep.to(x.dtype).view(mask_shape)
    new = select_input_channels(m, keep)
    assert new.weight.shape[1] == 4
    with torch.no_grad():
        assert rel_err(new(x.index_select(dim, keep.nonzero().squeeze(1))), m(x)) <= FP32_TOL


@pytest.mark.parametrize("make, shape", [c for c in MODULE_CASES if not getattr(c[0](), "padding", (0,))[0]])
def test_absorb_constant_inputs_then_drop_them(make, shape):
    """Constant input channels folded into the bias, then removed: same output (unpadded ops)."""
    m = randomize_(make(), 0)
    dim = -1 if isinstance(m, nn.Linear) else 1
    channels = torch.tensor([1, 4])
    values = torch.tensor([2.5, -1.25])
    x = randn(*shape, seed=1, dtype=torch.float32)
    x = x.movedim(dim, 0).clone()
    x[1], x[4] = 2.5, -1.25
    x = x.movedim(0, dim)
    with torch.no_grad():
        ref = m(x)
        absorbed = absorb_constant_inputs_(m, values, channels)
        assert absorbed is m and m.bias is not None
        keep = torch.ones(6, dtype=torch.bool)
        keep[channels] = False
        new = select_input_channels(m, keep)
        assert rel_err(new(x.index_select(dim, keep.nonzero().squeeze(1))), ref) <= FP32_TOL


@pytest.mark.parametrize("make, shape", MODULE_CASES)
def test_scale_output_channels_in_place(make, shape):
    m = randomize_(make(), 0)
    slope = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.01])
    offset = torch.tensor([0.0, 6.0, 1.0, -2.0, 0.0])
    dim = -1 if isinstance(m, nn.Linear) else 1
    x = randn(*shape, seed=1, dtype=torch.float32)
    view = [1] * len(shape)
    view[dim] = -1
    with torch.no_grad():
        ref = m(x).double() * slope.double().view(view) + offset.double().view(view)
        out = scale_output_channels_(m, slope, offset)
        assert out is m and m.bias is not None  # a bias is created when the module had none
        assert m.weight.dtype == torch.float32
        assert rel_err(m(x), ref) <= FP32_TOL


# --------------------------------------------------------------------------------------------------
# ChannelAffine
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, channel_dim", [((2, 5, 3, 4), 1), ((3, 7, 5), -1), ((4, 5), -1), ((4, 5), 1)])
def test_channel_affine(shape, channel_dim):
    c = shape[channel_dim]
    slope, offset = randn(c, seed=0, dtype=torch.float32), randn(c, seed=1, dtype=torch.float32)
    mod = ChannelAffine(slope, offset, channel_dim)
    x = randn(*shape, seed=2, dtype=torch.float32)
    moved = x.movedim(channel_dim, -1)
    ref = (moved * slope + offset).movedim(-1, channel_dim)
    assert torch.allclose(mod(x), ref, rtol=0, atol=1e-6)
    # follows the input's dtype; buffers travel with the state_dict
    assert mod(x.double()).dtype == torch.float64
    assert set(mod.state_dict()) == {"slope", "offset"}
    assert f"channels={c}" in repr(mod)


def test_channel_affine_copies_its_tensors():
    slope, offset = torch.ones(3), torch.zeros(3)
    mod = ChannelAffine(slope, offset)
    slope.fill_(5.0)
    assert torch.equal(mod.slope, torch.ones(3))

