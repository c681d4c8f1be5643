"""Tests for nepenthe.ops: reference sign histograms, entropies and mask application.

The histogram tests compare against a deliberately naive per-element Python loop, so they are the
oracle for any fused backend that later replaces the reference implementation.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from nepenthe import ops
from nepenthe.ops import OFF, ON, SAT, ZERO
from nepenthe.testing import signed_values

# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def loop_histogram(x: torch.Tensor, channel_dim: int = 1, upper: float | None = None) -> torch.Tensor:
    """Per-element Python reference: visit every index of ``x`` and bump its channel's counters."""
    channel_dim %= x.dim()
    channels = x.shape[channel_dim]
    counts = [[0, 0, 0, 0] for _ in range(channels)]
    for index in itertools.product(*(range(s) for s in x.shape)):
        v = float(x[index])
        c = index[channel_dim]
        if v > 0:
            counts[c][ON] += 1
        if v < 0:
            counts[c][OFF] += 1
        if v == 0:
            counts[c][ZERO] += 1
        if upper is not None and v >= upper:
            counts[c][SAT] += 1
    return torch.tensor(counts, dtype=torch.int64).reshape(channels, 4)


def sample(shape, seed: int = 0, dtype=torch.float32, scale: float = 4.0) -> torch.Tensor:
    """Random values with plenty of exact zeros and values around the ReLU6 kink (6 exactly too)."""
    return signed_values(shape, dtype, seed=seed, scale=scale, upper=6.0)


def hist(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


# --------------------------------------------------------------------------------------------------
# sign_histogram against the loop reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, channel_dim",
    [
        ((2, 3, 4, 5), 1),  # NCHW conv output
        ((2, 3, 4, 5), -3),  # same dim, negative index
        ((7, 5), -1),  # Linear output
        ((7, 5), 1),
        ((3, 4, 6), -1),  # tokens: N x T x C
        ((3, 4, 6), 1),
        ((3, 4, 6), 0),
        ((2, 3, 4, 5), 3),
        ((2, 3, 4, 5), 2),
        ((2, 3, 1, 5, 2), 4),  # 5-D, size-1 dim
        ((13,), 0),  # 1-D along the channel dim: 13 neurons, one observation each
        ((1, 1, 1, 1), 1),  # a single element
        ((5, 1), 1),  # one channel
    ],
)
@pytest.mark.parametrize("upper", [None, 6.0])
def test_sign_histogram_matches_loop(shape, channel_dim, upper):
    x = sample(shape, seed=sum(shape) + channel_dim)
    got = ops.sign_histogram(x, channel_dim, upper)
    assert got.dtype == torch.int64
    assert got.shape == (x.shape[channel_dim], 4)
    assert torch.equal(got, loop_histogram(x, channel_dim, upper))


def test_sign_histogram_hand_example():
    # channel 0 sees [1, -2, 0, 7], channel 1 sees [6, -0., 0.5, -1]
    x = torch.tensor([[1.0, 6.0], [-2.0, -0.0], [0.0, 0.5], [7.0, -1.0]])
    got = ops.sign_histogram(x, channel_dim=1, upper=6.0)
    # columns ON, OFF, ZERO, SAT; SAT (>= 6) counted in addition to ON; -0.0 is a ZERO
    assert torch.equal(got, hist([[2, 1, 1, 1], [2, 1, 1, 1]]))
    no_kink = ops.sign_histogram(x, channel_dim=1)
    assert torch.equal(no_kink, hist([[2, 1, 1, 0], [2, 1, 1, 0]]))


def test_sign_histogram_default_channel_dim_is_1():
    x = sample((2, 3, 4))
    assert torch.equal(ops.sign_histogram(x), loop_histogram(x, 1))


def test_sat_is_subset_of_on():
    x = sample((4, 8, 5, 5), seed=3, scale=8.0)
    h = ops.sign_histogram(x, 1, upper=6.0)
    assert (h[:, SAT] <= h[:, ON]).all()
    assert (h[:, SAT] > 0).any()
    # every observation lands in exactly one of ON/OFF/ZERO (finite input)
    assert (h[:, :3].sum(1) == x.numel() // x.shape[1]).all()
    # SAT counts z >= upper exactly, boundary included
    edge = torch.tensor([[5.999], [6.0], [6.001], [100.0]])
    assert torch.equal(ops.sign_histogram(edge, 1, 6.0), hist([[4, 0, 0, 3]]))


def test_other_upper_values():
    x = torch.tensor([[-1.0, 0.5, 1.0, 2.0, 3.0]])
    assert ops.sign_histogram(x, 0, upper=1.0)[0].tolist() == [4, 1, 0, 3]
    assert ops.sign_histogram(x, 0, upper=0.0)[0].tolist() == [4, 1, 0, 4]


def test_sign_histogram_single_element():
    assert torch.equal(ops.sign_histogram(torch.tensor([3.0]), 0), hist([[1, 0, 0, 0]]))
    assert torch.equal(ops.sign_histogram(torch.tensor([[-3.0]]), -1), hist([[0, 1, 0, 0]]))
    assert torch.equal(ops.sign_histogram(torch.tensor([[[[0.0]]]]), 1), hist([[0, 0, 1, 0]]))
    assert torch.equal(ops.sign_histogram(torch.tensor([[6.0]]), 1, 6.0), hist([[1, 0, 0, 1]]))


def test_sign_histogram_channels_without_observations():
    # C = 3 neurons, 0 observations each (empty batch)
    for x, dim in [(torch.zeros(0, 3), 1), (torch.zeros(0, 3), -1), (torch.zeros(0, 3, 4, 4), 1),
                   (torch.zeros(2, 3, 0, 4), 1), (torch.zeros(2, 0, 3), -1)]:
        got = ops.sign_histogram(x, dim, upper=6.0)
        assert got.dtype == torch.int64
        assert torch.equal(got, torch.zeros(3, 4, dtype=torch.int64))


def test_sign_histogram_zero_channels():
    for x, dim in [(torch.zeros(4, 0), 1), (torch.zeros(4, 0), -1), (torch.zeros(2, 0, 5, 5), 1),
                   (torch.zeros(0, 0), 0), (torch.zeros(0), 0)]:
        got = ops.sign_histogram(x, dim)
        assert got.dtype == torch.int64
        assert got.shape == (0, 4)


def test_sign_histogram_scalar_rejected():
    with pytest.raises(ValueError, match="scalar"):
        ops.sign_histogram(torch.tensor(1.0))


def test_sign_histogram_non_contiguous_inputs():
    base = sample((6, 5, 4, 3), seed=11)
    transposed = base.transpose(1, 3)  # 6 x 3 x 4 x 5, non-contiguous
    assert not transposed.is_contiguous()
    for dim in (0, 1, 2, 3, -1):
        assert torch.equal(ops.sign_histogram(transposed, dim, 6.0), loop_histogram(transposed, dim, 6.0))
        assert torch.equal(ops.sign_histogram(transposed, dim, 6.0),
                           ops.sign_histogram(transposed.contiguous(), dim, 6.0))
    sliced = base[::2, 1:, ::3, :]  # strided slice
    assert not sliced.is_contiguous()
    assert torch.equal(ops.sign_histogram(sliced, 1, 6.0), loop_histogram(sliced, 1, 6.0))
    expanded = torch.tensor([1.0, -1.0, 0.0]).expand(4, 3)  # stride 0 along the batch
    assert torch.equal(ops.sign_histogram(expanded, 1), hist([[4, 0, 0, 0], [0, 4, 0, 0], [0, 0, 4, 0]]))


def test_sign_histogram_channels_last():
    x = sample((3, 5, 4, 6), seed=5)
    cl = x.to(memory_format=torch.channels_last)
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    assert torch.equal(ops.sign_histogram(cl, 1, 6.0), loop_histogram(x, 1, 6.0))
    x3 = sample((2, 3, 2, 3, 4), seed=6)
    cl3 = x3.to(memory_format=torch.channels_last_3d)
    assert torch.equal(ops.sign_histogram(cl3, 1, 6.0), loop_histogram(x3, 1, 6.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_sign_histogram_dtypes(dtype):
    x = sample((3, 4, 5), seed=7, dtype=dtype)
    got = ops.sign_histogram(x, 1, 6.0)
    assert got.dtype == torch.int64
    assert torch.equal(got, loop_histogram(x, 1, 6.0))
    # the same values in fp32 give the same counts (all sample values survive the cast's sign)
    assert torch.equal(got, ops.sign_histogram(x.float(), 1, 6.0))


def test_sign_histogram_low_precision_edge_values():
    # subnormal / tiny values keep their sign in fp16 and bf16; 6 is exact in both
    for dtype in (torch.float16, torch.bfloat16):
        tiny = torch.finfo(dtype).tiny
        x = torch.tensor([[tiny, -tiny, 0.0, 6.0, 5.96875]], dtype=dtype).T  # 5 obs, 1 channel
        assert ops.sign_histogram(x, 1, 6.0).tolist() == [[3, 1, 1, 1]]


def test_nan_is_counted_nowhere_and_inf_is_signed():
    x = torch.tensor([[float("nan"), 1.0], [float("nan"), -1.0], [2.0, float("inf")], [float("-inf"), 0.0]])
    got = ops.sign_histogram(x, 1, 6.0)
    # channel 0: nan, nan, 2, -inf -> ON 1, OFF 1; channel 1: 1, -1, inf, 0 -> ON 2 (inf is SAT), OFF 1, ZERO 1
    assert torch.equal(got, hist([[1, 1, 0, 0], [2, 1, 1, 1]]))
    assert torch.equal(got, loop_histogram(x, 1, 6.0))


def test_sign_histogram_ignores_autograd():
    x = sample((4, 3)).requires_grad_()
    got = ops.sign_histogram(x * 1.0, -1)
    assert not got.requires_grad
    assert torch.equal(got, loop_histogram(x.detach(), -1))


# --------------------------------------------------------------------------------------------------
# accumulate_sign_histogram_
# --------------------------------------------------------------------------------------------------


def test_accumulate_adds_in_place():
    a, b = sample((4, 3, 2, 2), seed=1), sample((5, 3, 2, 2), seed=2)
    buf = torch.zeros(3, 4, dtype=torch.int64)
    out = ops.accumulate_sign_histogram_(buf, a, 1, 6.0)
    assert out is buf
    ops.accumulate_sign_histogram_(buf, b, 1, 6.0)
    assert torch.equal(buf, loop_histogram(torch.cat([a, b]), 1, 6.0))
    # accumulating a batch with no observations changes nothing
    ops.accumulate_sign_histogram_(buf, torch.zeros(0, 3, 2, 2), 1, 6.0)
    assert torch.equal(buf, loop_histogram(torch.cat([a, b]), 1, 6.0))


def test_accumulate_channel_dim_minus_one_and_channels_last():
    x = sample((2, 3, 4, 5), seed=9)
    buf = torch.zeros(5, 4, dtype=torch.int64)
    ops.accumulate_sign_histogram_(buf, x, -1)
    assert torch.equal(buf, loop_histogram(x, -1))
    buf3 = torch.zeros(3, 4, dtype=torch.int64)
    ops.accumulate_sign_histogram_(buf3, x.to(memory_format=torch.channels_last), 1)
    assert torch.equal(buf3, loop_histogram(x, 1))


@pytest.mark.parametrize(
    "buf",
    [
        torch.zeros(3, 4, dtype=torch.int32),  # wrong dtype
        torch.zeros(3, 4, dtype=torch.float32),
        torch.zeros(4, 4, dtype=torch.int64),  # wrong channel count
        torch.zeros(3, 3, dtype=torch.int64),  # wrong number of states
        torch.zeros(12, dtype=torch.int64),  # wrong rank
        torch.zeros(1, 3, 4, dtype=torch.int64),
    ],
)
def test_accumulate_rejects_bad_buffer(buf):
    before = buf.clone()
    with pytest.raises(ValueError, match="histogram buffer must be int64"):
        ops.accumulate_sign_histogram_(buf, torch.randn(2, 3), 1)
    assert torch.equal(buf, before)


def test_accumulate_error_names_expected_shape():
    with pytest.raises(ValueError, match=r"int64\[5, 4\]"):
        ops.accumulate_sign_histogram_(torch.zeros(3, 4, dtype=torch.int64), torch.randn(2, 5), -1)


# --------------------------------------------------------------------------------------------------
# entropies
# --------------------------------------------------------------------------------------------------


def H2(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def test_binary_entropy_scalar():
    assert ops.binary_entropy(0.5) == 1.0
    assert ops.binary_entropy(0.0) == 0.0 and ops.binary_entropy(1.0) == 0.0
    assert ops.binary_entropy(-0.1) == 0.0 and ops.binary_entropy(1.5) == 0.0
    assert ops.binary_entropy(0.25) == pytest.approx(0.8112781244591328, abs=1e-12)
    assert ops.binary_entropy(0.25) == pytest.approx(ops.binary_entropy(0.75), abs=1e-15)


def test_neuron_entropy_hand_computed():
    h = hist([
        [5, 5, 0, 0],  # p = 1/2 -> 1 bit
        [1, 3, 0, 0],  # p = 1/4 -> -1/4 log2 1/4 - 3/4 log2 3/4 = 0.5 + 0.311278 = 0.811278
        [3, 1, 0, 0],  # p = 3/4 -> same
        [7, 0, 0, 0],  # always ON -> 0
        [0, 9, 0, 0],  # always OFF -> 0
        [0, 0, 0, 0],  # no observation -> 0
        [0, 0, 4, 0],  # only zeros, excluded -> no observation -> 0
    ])
    ent = ops.neuron_entropy_from_histogram(h)
    assert ent.dtype == torch.float64 and ent.shape == (7,)
    expected = [1.0, 0.8112781244591328, 0.8112781244591328, 0.0, 0.0, 0.0, 0.0]
    assert ent.tolist() == pytest.approx(expected, abs=1e-12)
    assert ent[0].item() == 1.0  # exact
    assert (ent[3:] == 0).all()  # exactly 0, not -0 or tiny
    assert not torch.isnan(ent).any()


def test_three_region_entropy_with_saturation():
    h = hist([
        [4, 4, 0, 2],  # OFF 4, linear ON 2, SAT 2 -> q = (1/2, 1/4, 1/4): 0.5 + 0.5 + 0.5 = 1.5 bits
        [6, 0, 0, 6],  # always saturated -> 0
        [6, 0, 0, 3],  # linear 3, SAT 3 -> 1 bit
        [5, 0, 0, 0],  # never saturated, always ON -> 0
        [2, 2, 0, 0],  # OFF/ON half each, kink never reached -> 1 bit
        [3, 1, 0, 1],  # OFF 1, linear 2, SAT 1 -> (1/4, 1/2, 1/4) -> 1.5 bits
        [0, 3, 0, 0],  # always OFF -> 0
    ])
    ent = ops.neuron_entropy_from_histogram(h)
    assert ent.tolist() == pytest.approx([1.5, 0.0, 1.0, 0.0, 1.0, 1.5, 0.0], abs=1e-12)


def test_three_region_general_formula():
    # OFF 1, linear 2, SAT 3 of 6 observations: H = -(1/6 log 1/6 + 2/6 log 2/6 + 3/6 log 3/6)
    h = hist([[5, 1, 0, 3]])
    expected = -sum(q * math.log2(q) for q in (1 / 6, 2 / 6, 3 / 6))
    assert ops.neuron_entropy_from_histogram(h).item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(1.4591479170272448, abs=1e-12)


@pytest.mark.parametrize(
    "zero_as, expected",
    [
        # neuron: ON 1, OFF 1, ZERO 2
        #   exclude: p = 1/2 -> 1
        #   off:     ON 1 vs OFF 3 -> p = 1/4 -> 0.811278
        #   on:      ON 3 vs OFF 1 -> p = 3/4 -> 0.811278
        ("exclude", [1.0, 0.0, 0.0, 0.0]),
        ("off", [0.8112781244591328, 0.0, 0.9182958340544896, 0.0]),
        ("on", [0.8112781244591328, 0.9182958340544896, 0.0, 0.0]),
    ],
)
def test_zero_as(zero_as, expected):
    h = hist([
        [1, 1, 2, 0],
        [0, 2, 1, 0],  # exclude: always OFF; off: OFF 3 -> 0; on: ON 1 / OFF 2 -> H(1/3) = 0.918296
        [2, 0, 1, 0],  # exclude: always ON; off: ON 2 / OFF 1 -> H(1/3); on: ON 3 -> 0
        [0, 0, 0, 0],  # nothing -> 0 under every rule
    ])
    ent = ops.neuron_entropy_from_histogram(h, zero_as)
    assert ent.tolist() == pytest.approx(expected, abs=1e-12)
    assert H2(1 / 3) == pytest.approx(0.9182958340544896, abs=1e-12)


def test_zero_as_with_saturation():
    # ON 4 (SAT 2), OFF 0, ZERO 2: exclude -> linear 2, SAT 2 -> 1 bit
    # off -> OFF 2, linear 2, SAT 2 -> log2(3); on -> linear 4, SAT 2 -> H(1/3)
    h = hist([[4, 0, 2, 2]])
    assert ops.neuron_entropy_from_histogram(h, "exclude").item() == pytest.approx(1.0, abs=1e-12)
    assert ops.neuron_entropy_from_histogram(h, "off").item() == pytest.approx(math.log2(3), abs=1e-12)
    assert ops.neuron_entropy_from_histogram(h, "on").item() == pytest.approx(H2(1 / 3), abs=1e-12)


def test_state_counts():
    h = hist([[5, 2, 3, 1], [0, 0, 0, 0]])
    off, lin, sat = ops.state_counts(h)
    assert off.dtype == torch.float64
    assert off.tolist() == [2, 0] and lin.tolist() == [4, 0] and sat.tolist() == [1, 0]
    off, lin, sat = ops.state_counts(h, "off")
    assert off.tolist() == [5, 0] and lin.tolist() == [4, 0]
    off, lin, sat = ops.state_counts(h, "on")
    assert off.tolist() == [2, 0] and lin.tolist() == [7, 0]
    with pytest.raises(ValueError, match="zero_as"):
        ops.state_counts(h, "nan")
    with pytest.raises(ValueError, match="zero_as"):
        ops.neuron_entropy_from_histogram(h, "ignore")


def test_aggregate_options_hand_computed():
    neuron = torch.tensor([1.0, 0.0, 0.5, 0.0], dtype=torch.float64)
    assert ops.aggregate_layer_entropy(neuron, "mean") == pytest.approx(1.5 / 4)  # 0.375
    assert ops.aggregate_layer_entropy(neuron, "mixed_mean") == pytest.approx(0.75)  # (1 + 0.5) / 2
    assert ops.aggregate_layer_entropy(neuron, "sum") == pytest.approx(1.5)
    assert ops.aggregate_layer_entropy(neuron) == pytest.approx(0.375)
    zeros = torch.zeros(5, dtype=torch.float64)
    for agg in ops.AGGREGATES:
        assert ops.aggregate_layer_entropy(zeros, agg) == 0.0
        assert ops.aggregate_layer_entropy(torch.zeros(0, dtype=torch.float64), agg) == 0.0
    with pytest.raises(ValueError, match="aggregate"):
        ops.aggregate_layer_entropy(neuron, "max")


def test_entropy_from_histogram_all_options():
    h = hist([
        [1, 1, 0, 0],  # 1 bit under every zero rule
        [1, 3, 0, 0],  # 0.811278
        [4, 0, 4, 0],  # exclude: 0, off: 1, on: 0
        [0, 0, 0, 0],  # 0
    ])
    b = 0.8112781244591328
    expected_neurons = {"exclude": [1, b, 0, 0], "off": [1, b, 1, 0], "on": [1, b, 0, 0]}
    for zero_as, neurons in expected_neurons.items():
        mixed = [v for v in neurons if v > 0]
        expected_layer = {"mean": sum(neurons) / 4, "mixed_mean": sum(mixed) / len(mixed), "sum": sum(neurons)}
        for agg, layer in expected_layer.items():
            n, l_ = ops.entropy_from_histogram(h, zero_as, agg)
            assert n.tolist() == pytest.approx(neurons, abs=1e-12)
            assert isinstance(l_, torch.Tensor) and l_.dtype == torch.float64 and l_.dim() == 0
            assert float(l_) == pytest.approx(layer, abs=1e-12), (zero_as, agg)
    # exclude/mean: (1 + 0.811278) / 4 = 0.452820
    assert ops.entropy_from_histogram(h)[1] == pytest.approx((1 + b) / 4, abs=1e-12)


def test_layer_entropy_zero_iff_all_neurons_constant():
    constant = hist([[3, 0, 0, 0], [0, 3, 0, 0], [0, 0, 3, 0], [3, 0, 0, 3], [0, 0, 0, 0]])
    for agg in ops.AGGREGATES:
        assert ops.entropy_from_histogram(constant, aggregate=agg)[1] == 0.0
    mixed = torch.cat([constant, hist([[1, 1000, 0, 0]])])
    for agg in ops.AGGREGATES:
        assert ops.entropy_from_histogram(mixed, aggregate=agg)[1] > 0.0


def test_entropy_large_counts_exact_enough():
    # int64 counts beyond float32 precision still give the right p
    big = 2**40
    h = hist([[big, big, 0, 0], [big, 3 * big, 0, 0]])
    assert ops.neuron_entropy_from_histogram(h).tolist() == pytest.approx([1.0, 0.8112781244591328], abs=1e-12)


def test_entropy_of_empty_layer():
    n, layer = ops.entropy_from_histogram(torch.zeros(0, 4, dtype=torch.int64))
    assert n.shape == (0,) and layer == 0.0


# --------------------------------------------------------------------------------------------------
# apply_mask_
# --------------------------------------------------------------------------------------------------


def test_apply_mask_zeroes_param_and_state():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(4, 5, generator=g) + 10.0  # all nonzero
    mask = torch.rand(4, 5, generator=g) > 0.5
    state = {
        "momentum_buffer": torch.randn(4, 5, generator=g),
        "exp_avg": torch.randn(4, 5, generator=g),
        "exp_avg_sq": torch.rand(4, 5, generator=g),
        "max_exp_avg_sq": torch.rand(4, 5, generator=g),
        "step": torch.tensor(3.0),  # not per-element: untouched
        "other": torch.randn(4, 5, generator=g),  # unknown key: untouched
    }
    before = {k: v.clone() for k, v in state.items()}
    p_before = p.clone()
    ptr = p.data_ptr()
    ops.apply_mask_(p, mask, state)
    assert p.data_ptr() == ptr  # in place
    assert (p[~mask] == 0).all() and torch.equal(p[mask], p_before[mask])
    for key in ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert (state[key][~mask] == 0).all(), key
        assert torch.equal(state[key][mask], before[key][mask]), key
    assert torch.equal(state["step"], before["step"])
    assert torch.equal(state["other"], before["other"])


def test_apply_mask_without_state_and_with_none_entries():
    p = torch.ones(3, 3)
    mask = torch.eye(3, dtype=torch.bool)
    ops.apply_mask_(p, mask)
    assert torch.equal(p, torch.eye(3))
    p = torch.ones(3, 3)
    ops.apply_mask_(p, mask, {"momentum_buffer": None})  # SGD without momentum stores None
    assert torch.equal(p, torch.eye(3))
    # a state tensor of another shape is left alone
    odd = torch.ones(9)
    ops.apply_mask_(p, mask, {"exp_avg": odd})
    assert torch.equal(odd, torch.ones(9))


def test_apply_mask_on_parameter_with_grad_and_low_precision():
    p = torch.nn.Parameter(torch.full((2, 3), 2.0, dtype=torch.bfloat16))
    mask = torch.tensor([[True, False, True], [False, True, False]])
    state = {"exp_avg": torch.ones(2, 3, dtype=torch.float32)}
    ops.apply_mask_(p, mask, state)  # no "a leaf Variable that requires grad" error: runs under no_grad
    assert p.dtype == torch.bfloat16
    assert torch.equal(p.detach().float(), 2.0 * mask.float())
    assert torch.equal(state["exp_avg"], mask.float())


def test_apply_mask_float_mask_and_idempotent():
    p = torch.arange(1.0, 7.0).reshape(2, 3)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    ops.apply_mask_(p, mask)
    ops.apply_mask_(p, mask)
    assert torch.equal(p, torch.tensor([[1.0, 0.0, 3.0], [0.0, 0.0, 6.0]]))
