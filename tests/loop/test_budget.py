"""Tests for nepenthe.budget: the entropy-weighted budget split (SPEC §2) and magnitude masks.

Every expected integer below is worked out by hand in the comments. Shorthands used there:
softmax of two logits (x, y) gives the first layer 1 / (1 + e^(y - x)); e^-1.5 = 0.223130,
e^-1 = 0.367879, e^-2.5 = 0.082085.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nepenthe.budget import global_magnitude_masks, irrelevance, magnitude_mask, weights_to_prune


def ones(*names: str) -> dict[str, float]:
    return {n: 1.0 for n in names}


# --------------------------------------------------------------------------------------------------
# weights_to_prune: hand-computed cases
# --------------------------------------------------------------------------------------------------


def test_equal_irrelevances_split_evenly():
    # I_a = I_b = 0.5: R_a = R_b = 1.0 / 0.5 = 2, softmax = (1/2, 1/2)
    # B = floor(0.5 * (100 + 100)) = 100 -> 50 each
    assert weights_to_prune(ones("a", "b"), {"a": 100, "b": 100}, {"a": 0.5, "b": 0.5}) == {"a": 50, "b": 50}


def test_equal_irrelevances_rounding_is_exact_and_deterministic():
    # B = floor(0.35 * 30) = floor(10.5) = 10, three equal shares of 10/3 = 3.333...
    # floors 3 + 3 + 3 = 9, one weight left over goes to one layer: {3, 3, 4} in some order
    args = (ones("a", "b", "c"), {"a": 10, "b": 10, "c": 10}, {"a": 1.0, "b": 1.0, "c": 1.0})
    result = weights_to_prune(*args, zeta=0.35)
    assert sum(result.values()) == 10
    assert sorted(result.values()) == [3, 3, 4]
    assert weights_to_prune(*args, zeta=0.35) == result
    # independent of the dicts' order
    rev = [dict(reversed(list(d.items()))) for d in args]
    assert weights_to_prune(*rev, zeta=0.35) == result


def test_unequal_irrelevances_softmax_of_relevance():
    # I_a = 1, I_b = 2, sum 3: R_a = 3, R_b = 1.5
    # share_a = 1 / (1 + e^(1.5 - 3)) = 1 / (1 + 0.223130) = 0.817574, share_b = 0.182426
    # B = floor(0.5 * 2000) = 1000 -> amounts 817.574 and 182.426, neither reaches 1000
    # floors 817 + 182 = 999; the leftover goes to the larger fraction (.574 > .426): a = 818
    result = weights_to_prune(ones("a", "b"), {"a": 1000, "b": 1000}, {"a": 1.0, "b": 2.0})
    assert result == {"a": 818, "b": 182}
    # the less irrelevant layer (higher I) loses fewer weights
    assert result["b"] < result["a"]


def test_budget_is_floor_of_zeta_times_remaining():
    # B = floor(0.3 * (7 + 11 + 13)) = floor(9.3) = 9
    result = weights_to_prune(ones("a", "b", "c"), {"a": 7, "b": 11, "c": 13}, {"a": 1.0, "b": 1.1, "c": 1.2},
                              zeta=0.3)
    assert sum(result.values()) == 9
    # zeta = 0 prunes nothing; zeta = 1 empties every prunable layer
    assert weights_to_prune(ones("a", "b"), {"a": 7, "b": 9}, {"a": 1.0, "b": 3.0}, zeta=0.0) == {"a": 0, "b": 0}
    assert weights_to_prune(ones("a", "b"), {"a": 7, "b": 9}, {"a": 1.0, "b": 3.0}, zeta=1.0) == {"a": 7, "b": 9}
    assert weights_to_prune(ones("a", "b", "c"), {"a": 10, "b": 10, "c": 10}, ones("a", "b", "c"),
                            zeta=1.0) == {"a": 10, "b": 10, "c": 10}


def test_frozen_layers_get_zero_and_leave_the_budget():
    # z has H = 0 (frozen: linearizable), e has no weight left, m has no entropy entry at all.
    # B = floor(0.5 * (a 40 + b 40)) = 40, equal irrelevance -> 20 each; z/e/m contribute nothing
    entropy = {"a": 0.7, "b": 0.7, "z": 0.0, "e": 0.9}
    remaining = {"a": 40, "b": 40, "z": 1000, "e": 0, "m": 500}
    irr = {"a": 0.35, "b": 0.35, "z": 0.0, "e": 0.0, "m": 0.2}
    result = weights_to_prune(entropy, remaining, irr)
    assert result == {"a": 20, "b": 20, "z": 0, "e": 0, "m": 0}
    assert set(result) == set(remaining)  # one entry per layer, frozen ones included


def test_everything_frozen_gives_all_zeros():
    assert weights_to_prune({"a": 0.0, "b": 0.0}, {"a": 10, "b": 5}, {"a": 0.0, "b": 0.0}) == {"a": 0, "b": 0}
    assert weights_to_prune({"a": 1.0}, {"a": 0}, {"a": 0.0}) == {"a": 0}
    assert weights_to_prune({}, {}, {}) == {}


def test_water_filling_one_layer_emptied_and_rest_resplit():
    # I = (a 1, b 2, c 4), sum 7: R = (7, 3.5, 1.75)
    # softmax: e^7 = 1096.633, e^3.5 = 33.115, e^1.75 = 5.755, total 1135.503
    #   shares (0.965770, 0.029163, 0.005068)
    # B = floor(0.5 * (100 + 1000 + 1000)) = 1050: a's amount 1014.1 >= 100 -> a emptied (100)
    # B' = 1050 - 100 = 950 over (b, c) with a's irrelevance gone: sum 6, R = (3, 1.5)
    #   shares (0.817574, 0.182426) -> 776.695, 173.305 -> floors 776 + 173 = 949, +1 to b (.695)
    # (had a's irrelevance stayed in the sum, R = (3.5, 1.75) and b would get 0.852 * 950 = 809)
    result = weights_to_prune(ones("a", "b", "c"), {"a": 100, "b": 1000, "c": 1000}, {"a": 1.0, "b": 2.0, "c": 4.0})
    assert result == {"a": 100, "b": 777, "c": 173}


def test_water_filling_cascade_over_two_rounds():
    # Round 1: I = (a 1, b 1.5, c 3), sum 5.5 -> R = (5.5, 3.667, 1.833)
    #   shares (0.843568, 0.134869, 0.021563), B = floor(0.5 * 1250) = 625
    #   amounts (527.2, 84.3, 13.5): only a overflows (>= 50) -> a = 50, B = 575
    # Round 2: I = (b 1.5, c 3), sum 4.5 -> R = (3, 1.5) -> shares (0.817574, 0.182426)
    #   amounts (470.1, 104.9): b overflows (>= 200) -> b = 200, B = 375
    # Round 3: c alone takes share 1 -> 375 (< 1000)
    result = weights_to_prune(ones("a", "b", "c"), {"a": 50, "b": 200, "c": 1000}, {"a": 1.0, "b": 1.5, "c": 3.0})
    assert result == {"a": 50, "b": 200, "c": 375}


def test_water_filling_cascade_four_layers():
    # Round 1: I = (1, 2, 4, 4), sum 11 -> R = (11, 5.5, 2.75, 2.75); share_a = 0.99541
    #   B = floor(0.5 * (50 + 200 + 1000 + 1002)) = 1126 -> a's amount 1120.8 >= 50 -> a = 50, B = 1076
    # Round 2: I = (2, 4, 4), sum 10 -> R = (5, 2.5, 2.5) -> share_b = 1 / (1 + 2 e^-2.5) = 0.858981
    #   b's amount 924.3 >= 200 -> b = 200, B = 876
    # Round 3: c, d equal -> 438 each (neither reaches 1000)
    result = weights_to_prune(ones("a", "b", "c", "d"), {"a": 50, "b": 200, "c": 1000, "d": 1002},
                              {"a": 1.0, "b": 2.0, "c": 4.0, "d": 4.0})
    assert result == {"a": 50, "b": 200, "c": 438, "d": 438}


def test_water_filling_two_layers_overflow_in_the_same_round():
    # I = (1, 1, 3), sum 5 -> R = (5, 5, 1.667): shares (0.491238, 0.491238, 0.017524)
    # B = floor(0.5 * 1080) = 540 -> amounts (265.3, 265.3, 9.5): a and b both >= 40 -> emptied
    # B = 540 - 80 = 460, all to c
    result = weights_to_prune(ones("a", "b", "c"), {"a": 40, "b": 40, "c": 1000}, {"a": 1.0, "b": 1.0, "c": 3.0})
    assert result == {"a": 40, "b": 40, "c": 460}


def test_zero_irrelevance_layers_emptied_first():
    # a has H > 0 but its remaining weights are all 0 -> I_a = 0, R_a = infinity: emptied first.
    # B = floor(0.5 * (10 + 100 + 100)) = 105 -> a = 10, B = 95 over (b, c):
    #   I = (1, 2), R = (3, 1.5) -> shares (0.817574, 0.182426) -> 77.67, 17.33 -> 77 + 17 = 94, +1 to b
    result = weights_to_prune(ones("a", "b", "c"), {"a": 10, "b": 100, "c": 100}, {"a": 0.0, "b": 1.0, "c": 2.0})
    assert result == {"a": 10, "b": 78, "c": 17}


def test_zero_irrelevance_layers_larger_than_budget_share_proportionally():
    # B = floor(0.5 * (100 + 300 + 10)) = 205 < 400 zero-irrelevance weights:
    # split 205 by remaining: a 205 * 100/400 = 51.25, b 153.75 -> 51 + 153 = 204, +1 to b (.75)
    # c (I > 0) gets nothing this round
    result = weights_to_prune(ones("a", "b", "c"), {"a": 100, "b": 300, "c": 10}, {"a": 0.0, "b": 0.0, "c": 1.0})
    assert result == {"a": 51, "b": 154, "c": 0}


def test_temperature():
    # I = (1, 2): R = (3, 1.5). tau = 1.5 -> logits (2, 1) -> share_a = 1 / (1 + e^-1) = 0.731059
    # B = 1000 -> 731.059, 268.941 -> 731 + 268 = 999, +1 to b (.941 > .059)
    args = (ones("a", "b"), {"a": 1000, "b": 1000}, {"a": 1.0, "b": 2.0})
    assert weights_to_prune(*args, temperature=1.5) == {"a": 731, "b": 269}
    # tau -> infinity: logits equal -> even split
    assert weights_to_prune(*args, temperature=1e6) == {"a": 500, "b": 500}
    # tau = 0.1: logits (30, 15): share_b = 3.1e-7 -> b's amount 0.0003, a's 999.9997 -> a takes all 1000
    assert weights_to_prune(*args, temperature=0.1) == {"a": 1000, "b": 0}
    # default temperature is 1
    assert weights_to_prune(*args) == weights_to_prune(*args, temperature=1.0) == {"a": 818, "b": 182}


@pytest.mark.parametrize("zeta", [-0.1, 1.0001, 2.0, float("nan"), float("inf")])
def test_invalid_zeta(zeta):
    with pytest.raises(ValueError, match="zeta"):
        weights_to_prune(ones("a"), {"a": 10}, {"a": 1.0}, zeta=zeta)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), -float("inf")])
def test_invalid_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        weights_to_prune(ones("a"), {"a": 10}, {"a": 1.0}, temperature=temperature)


# --------------------------------------------------------------------------------------------------
# weights_to_prune: properties
# --------------------------------------------------------------------------------------------------

_layer = st.tuples(
    st.integers(min_value=0, max_value=5000),  # remaining
    st.one_of(st.just(0.0), st.floats(min_value=0.01, max_value=3.0)),  # entropy (0 = frozen)
    st.one_of(st.just(0.0), st.floats(min_value=1e-3, max_value=10.0)),  # mean |w|
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.lists(_layer, min_size=1, max_size=8),
    zeta=st.floats(min_value=0.0, max_value=1.0),
    temperature=st.floats(min_value=0.05, max_value=20.0),
)
def test_weights_to_prune_properties(layers, zeta, temperature):
    names = [f"l{i}" for i in range(len(layers))]
    remaining = {n: r for n, (r, _, _) in zip(names, layers, strict=True)}
    entropy = {n: h for n, (_, h, _) in zip(names, layers, strict=True)}
    irr = {n: h * w for n, (_, h, w) in zip(names, layers, strict=True)}
    result = weights_to_prune(entropy, remaining, irr, zeta=zeta, temperature=temperature)
    assert set(result) == set(names)
    prunable = [n for n in names if entropy[n] > 0 and remaining[n] > 0]
    for n in names:
        assert isinstance(result[n], int)
        assert 0 <= result[n] <= remaining[n]  # never more than what is left
        if n not in prunable:
            assert result[n] == 0  # frozen layers always 0
    # the budget is spent exactly: floor(zeta * remaining weights of the prunable layers)
    assert sum(result.values()) == math.floor(zeta * sum(remaining[n] for n in prunable))


@settings(max_examples=150, deadline=None)
@given(irr=st.lists(st.floats(min_value=0.01, max_value=5.0), min_size=2, max_size=6))
def test_less_irrelevant_layer_never_loses_more(irr):
    # with equal remaining counts, a layer with a higher irrelevance (more useful) loses no more weights
    n = len(irr)
    names = [f"l{i}" for i in range(n)]
    remaining = {k: 1000 for k in names}
    irrs = dict(zip(names, irr, strict=True))
    result = weights_to_prune(ones(*names), remaining, irrs, zeta=0.5)
    order = sorted(names, key=lambda k: irrs[k])
    for lo, hi in zip(order, order[1:], strict=False):
        if irrs[lo] < irrs[hi]:
            assert result[lo] + 1 >= result[hi]  # +1: the largest-remainder rounding


# --------------------------------------------------------------------------------------------------
# irrelevance
# --------------------------------------------------------------------------------------------------


def test_irrelevance():
    w = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    assert irrelevance(0.5, w, None) == pytest.approx(0.5 * 2.5)  # mean |w| = 10 / 4
    mask = torch.tensor([[True, False], [False, True]])
    assert irrelevance(0.5, w, mask) == pytest.approx(0.5 * 2.5)  # (1 + 4) / 2
    mask = torch.tensor([[False, True], [True, False]])
    assert irrelevance(2.0, w, mask) == pytest.approx(2.0 * 2.5)  # (2 + 3) / 2
    assert irrelevance(0.0, w, None) == 0.0
    assert irrelevance(1.0, w, torch.zeros(2, 2, dtype=torch.bool)) == 0.0  # nothing left
    assert isinstance(irrelevance(1.0, w.half(), None), float)


# --------------------------------------------------------------------------------------------------
# magnitude_mask
# --------------------------------------------------------------------------------------------------


def test_magnitude_mask_prunes_smallest():
    w = torch.tensor([[0.5, -0.1, 3.0], [-2.0, 0.2, -0.05]])
    m = magnitude_mask(w, None, 3)  # |w| sorted: 0.05, 0.1, 0.2 pruned
    assert m.dtype == torch.bool
    assert m.tolist() == [[True, False, True], [True, False, False]]
    assert torch.equal(w, torch.tensor([[0.5, -0.1, 3.0], [-2.0, 0.2, -0.05]]))  # weight untouched


def test_magnitude_mask_only_grows():
    w = torch.tensor([[0.5, -0.1, 3.0], [-2.0, 0.2, -0.05]])
    mask = torch.tensor([[True, True, False], [True, True, True]])  # 3.0 already pruned
    m = magnitude_mask(w, mask, 2)  # among remaining: 0.05, 0.1 go
    assert m.tolist() == [[True, False, False], [True, True, False]]
    assert not (m & ~mask).any()  # nothing revived
    assert mask.tolist() == [[True, True, False], [True, True, True]]  # input mask not modified
    assert m is not mask
    # already-pruned small weights do not count toward n_prune
    w2 = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0])
    m2 = magnitude_mask(w2, torch.tensor([False, False, True, True, True]), 1)
    assert m2.tolist() == [False, False, False, True, True]


def test_magnitude_mask_ties_broken_by_position():
    w = torch.tensor([[1.0, -1.0, 1.0], [2.0, 1.0, -1.0]])
    assert magnitude_mask(w, None, 2).tolist() == [[False, False, True], [True, True, True]]
    assert magnitude_mask(w, None, 4).tolist() == [[False, False, False], [True, False, True]]
    mask = torch.tensor([[False, True, True], [True, True, True]])
    assert magnitude_mask(w, mask, 2).tolist() == [[False, False, False], [True, True, True]]
    # all equal: the first n in row-major order
    assert magnitude_mask(torch.ones(10), None, 4).tolist() == [False] * 4 + [True] * 6
    # deterministic across calls
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-3, 4, (8, 9), generator=g).float()
    assert torch.equal(magnitude_mask(w, None, 30), magnitude_mask(w.clone(), None, 30))


def test_magnitude_mask_counts_and_extremes():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 7, generator=g)
    for n in (0, 1, 10, 41):
        assert int((~magnitude_mask(w, None, n)).sum()) == n
    assert magnitude_mask(w, None, -5).all()
    assert not magnitude_mask(w, None, 42).any()  # == remaining: empties
    assert not magnitude_mask(w, None, 10_000).any()  # > remaining: empties
    mask = magnitude_mask(w, None, 40)
    assert not magnitude_mask(w, mask, 2).any()
    assert not magnitude_mask(w, mask, 3).any()
    empty = torch.zeros(6, 7, dtype=torch.bool)
    assert not magnitude_mask(w, empty, 1).any()


def test_magnitude_mask_layouts():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 3, 3, 3, generator=g)
    expected = magnitude_mask(w, None, 50)
    cl = w.to(memory_format=torch.channels_last)
    got = magnitude_mask(cl, None, 50)
    assert int((~got).sum()) == 50
    assert torch.equal(got, expected)
    # a channels_last mask from an earlier round keeps growing too
    mask_cl = expected.to(memory_format=torch.channels_last)
    assert torch.equal(magnitude_mask(cl, mask_cl, 20), magnitude_mask(w, expected, 20))
    # a transposed (non-contiguous) weight and mask
    wt = torch.randn(5, 7, generator=g).t()
    mt = magnitude_mask(wt.contiguous(), None, 9).t().contiguous().t()
    assert torch.equal(magnitude_mask(wt, mt, 6), magnitude_mask(wt.contiguous(), mt.contiguous(), 6))
    assert int((~magnitude_mask(wt, mt, 6)).sum()) == 15


def test_magnitude_mask_low_precision():
    w = torch.tensor([0.5, -0.25, 2.0, -1.0], dtype=torch.bfloat16)
    assert magnitude_mask(w, None, 2).tolist() == [False, False, True, True]


# --------------------------------------------------------------------------------------------------
# global_magnitude_masks
# --------------------------------------------------------------------------------------------------


def reference_global_masks(weights, masks, fraction):
    """Rank every remaining weight of every layer by (|w|, layer order, row-major position)."""
    entries = []
    for li, (name, w) in enumerate(weights.items()):
        mask = masks.get(name)
        flat = w.reshape(-1).tolist()
        alive = [True] * len(flat) if mask is None else mask.reshape(-1).tolist()
        entries += [(abs(v), li, i) for i, (v, a) in enumerate(zip(flat, alive, strict=True)) if a]
    n_prune = math.floor(fraction * len(entries))
    pruned = {(li, i) for _, li, i in sorted(entries)[:n_prune]}
    out = {}
    for li, (name, w) in enumerate(weights.items()):
        mask = masks.get(name)
        alive = [True] * w.numel() if mask is None else mask.reshape(-1).tolist()
        out[name] = torch.tensor([a and (li, i) not in pruned for i, a in enumerate(alive)]).reshape(w.shape)
    return out


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.2, 0.5, 0.73, 0.99, 1.0])
def test_global_magnitude_masks_matches_reference(fraction):
    g = torch.Generator().manual_seed(3)
    weights = {
        "conv": torch.randn(4, 3, 3, 3, generator=g),
        "fc1": (torch.randn(10, 8, generator=g) * 4).round() / 4,  # many ties, also across layers
        "fc2": (torch.randn(3, 10, generator=g) * 4).round() / 4,
    }
    masks = {"conv": None, "fc1": torch.rand(10, 8, generator=g) > 0.3}  # fc2 missing = all alive
    got = global_magnitude_masks(weights, masks, fraction)
    ref = reference_global_masks(weights, masks, fraction)
    assert set(got) == set(weights)
    for name in weights:
        assert got[name].dtype == torch.bool
        assert torch.equal(got[name], ref[name]), name
    assert not (got["fc1"] & ~masks["fc1"]).any()  # masks only grow
    remaining = weights["conv"].numel() + int(masks["fc1"].sum()) + weights["fc2"].numel()
    pruned_now = remaining - sum(int(m.sum()) for m in got.values())
    assert pruned_now == math.floor(fraction * remaining)


def test_global_magnitude_masks_threshold_is_global():
    # layer "big" has only large weights: a global threshold prunes mostly from "small"
    weights = {"small": torch.tensor([0.1, 0.2, 0.3, 0.4]), "big": torch.tensor([5.0, 6.0, 7.0, 0.25])}
    got = global_magnitude_masks(weights, {}, 0.5)  # 4 smallest of 8: 0.1, 0.2, 0.25, 0.3
    assert got["small"].tolist() == [False, False, False, True]
    assert got["big"].tolist() == [True, True, True, False]


def test_global_magnitude_masks_does_not_mutate_inputs():
    weights = {"a": torch.tensor([1.0, 2.0, 3.0])}
    mask = torch.tensor([True, True, True])
    out = global_magnitude_masks(weights, {"a": mask}, 0.0)
    assert out["a"] is not mask and mask.all()
    out = global_magnitude_masks(weights, {"a": mask}, 0.4)  # floor(1.2) = 1
    assert out["a"].tolist() == [False, True, True] and mask.all()


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=4),
    fraction=st.floats(min_value=0.0, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_global_magnitude_masks_property(sizes, fraction, seed):
    g = torch.Generator().manual_seed(seed)
    weights = {f"l{i}": (torch.randn(s, generator=g) * 3).round() for i, s in enumerate(sizes)}
    masks = {n: torch.rand(w.shape, generator=g) > 0.2 for n, w in weights.items()}
    got = global_magnitude_masks(weights, masks, fraction)
    ref = reference_global_masks(weights, masks, fraction)
    for n in weights:
        assert torch.equal(got[n], ref[n])


def test_global_magnitude_masks_channels_last_weights():
    g = torch.Generator().manual_seed(4)
    w = {"c1": torch.randn(4, 3, 3, 3, generator=g), "c2": torch.randn(6, 4, 3, 3, generator=g)}
    cl = {k: v.to(memory_format=torch.channels_last) for k, v in w.items()}
    got = global_magnitude_masks(cl, {}, 0.4)
    ref = reference_global_masks(w, {}, 0.4)
    for k in w:
        assert torch.equal(got[k], ref[k])
    assert sum(int((~m).sum()) for m in got.values()) == math.floor(0.4 * (108 + 216))


# --------------------------------------------------------------------------------------------------
# Per-layer limits (caps), global IMP counts under caps, fan-in normalisation
# --------------------------------------------------------------------------------------------------


def test_limit_caps_a_layer_and_its_share_goes_to_the_others():
    # The same case as test_water_filling_one_layer_emptied_and_rest_resplit, but a may lose at most
    # 60 of its 100 weights: a takes 60 and leaves the pool with its irrelevance; the remaining
    # B' = 1050 - 60 = 990 over (b, c): shares (0.817574, 0.182426) -> 809.4, 180.6 -> 809 + 181
    result = weights_to_prune(ones("a", "b", "c"), {"a": 100, "b": 1000, "c": 1000}, {"a": 1.0, "b": 2.0, "c": 4.0},
                              limits={"a": 60})
    assert result == {"a": 60, "b": 809, "c": 181}


def test_limit_zero_freezes_a_layer_and_takes_it_out_of_the_budget():
    # a cannot lose anything: it leaves the pool and its weights leave the budget (as a frozen layer)
    # B = floor(0.5 * 2000) = 1000 over (b, c) with R = (3, 1.5): 817.57, 182.43 -> 818 + 182
    result = weights_to_prune(ones("a", "b", "c"), {"a": 100, "b": 1000, "c": 1000}, {"a": 1.0, "b": 2.0, "c": 4.0},
                              limits={"a": 0})
    assert result == {"a": 0, "b": 818, "c": 182}


def test_limits_larger_than_remaining_change_nothing():
    args = (ones("a", "b"), {"a": 100, "b": 300}, {"a": 1.0, "b": 3.0})
    assert weights_to_prune(*args, limits={"a": 10**9, "b": 301}) == weights_to_prune(*args)


def test_budget_no_layer_can_take_is_left_unspent():
    # every layer capped below its share: each takes its cap, the rest of B = 500 stays unpruned
    result = weights_to_prune(ones("a", "b"), {"a": 500, "b": 500}, {"a": 1.0, "b": 1.0}, limits={"a": 10, "b": 20})
    assert result == {"a": 10, "b": 20}


def test_limit_applies_to_zero_irrelevance_layers():
    result = weights_to_prune(ones("a", "b"), {"a": 10, "b": 100}, {"a": 0.0, "b": 1.0}, limits={"a": 4})
    assert result["a"] == 4 and result["b"] == 55 - 4  # B = floor(0.5 * 110) = 55


def test_global_counts_under_caps_move_to_the_next_smallest_weights():
    from nepenthe.budget import global_magnitude_counts

    weights = {"small": torch.tensor([0.1, 0.2, 0.3, 0.4]), "big": torch.tensor([5.0, 6.0, 7.0, 0.25])}
    # uncapped: the 4 smallest are 0.1, 0.2, 0.25 (big), 0.3 -> small 3, big 1
    assert global_magnitude_counts(weights, {}, 0.5) == {"small": 3, "big": 1}
    # small may lose only 1: 0.1, then 0.25 (big), then 5.0 and 6.0 (big) -> 4 in all
    assert global_magnitude_counts(weights, {}, 0.5, limits={"small": 1}) == {"small": 1, "big": 3}
    masks = global_magnitude_masks(weights, {}, 0.5, limits={"small": 1})
    assert masks["small"].tolist() == [False, True, True, True]
    assert masks["big"].tolist() == [False, False, True, False]
    # both capped: fewer than asked
    assert global_magnitude_counts(weights, {}, 0.5, limits={"small": 1, "big": 1}) == {"small": 1, "big": 1}


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=4),
       fraction=st.floats(min_value=0.0, max_value=1.0), seed=st.integers(min_value=0, max_value=2**31 - 1))
def test_global_counts_under_caps_property(sizes, fraction, seed):
    """Against a greedy reference: walk the global order, take a weight when its layer has room."""
    from nepenthe.budget import global_magnitude_counts

    g = torch.Generator().manual_seed(seed)
    weights = {f"l{i}": (torch.randn(s, generator=g) * 3).round() for i, s in enumerate(sizes)}
    masks = {n: torch.rand(w.shape, generator=g) > 0.2 for n, w in weights.items()}
    limits = {n: int(torch.randint(0, w.numel() + 1, (1,), generator=g)) for n, w in weights.items()}
    entries = sorted((float(abs(w[i])), li, i) for li, (n, w) in enumerate(weights.items())
                     for i in range(w.numel()) if masks[n][i])
    want = math.floor(fraction * len(entries))
    names = list(weights)
    expected = {n: 0 for n in names}
    for _, li, _ in entries:
        if sum(expected.values()) == want:
            break
        if expected[names[li]] < limits[names[li]]:
            expected[names[li]] += 1
    assert global_magnitude_counts(weights, masks, fraction, limits) == expected


def test_irrelevance_fan_in_normalisation():
    w = torch.full((4, 9), 0.5)  # fan-in 9
    assert irrelevance(2.0, w, None, normalize="fan_in") == pytest.approx(2.0 * 0.5 * 3.0)
    conv = torch.full((2, 3, 2, 2), 0.25)  # fan-in 3 * 2 * 2 = 12
    assert irrelevance(1.0, conv, None, normalize="fan_in") == pytest.approx(0.25 * math.sqrt(12))
    assert irrelevance(1.0, conv, None) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="normalize"):
        irrelevance(1.0, conv, None, normalize="fan_out")


def test_fan_in_normalisation_keeps_a_wide_stem_from_taking_the_budget():
    # He-like scales: a 784-input stem has mean |w| ~ 1/28, a 128-input layer ~ 1/11.3. Without
    # normalisation the stem is by far the least relevant and is emptied; with it they are even.
    # (the residual MLP of the Fashion-MNIST study: a stem and 8 blocks of 128 -> 256)
    g = torch.Generator().manual_seed(0)
    weights = {"stem": torch.randn(128, 784, generator=g) / 28}
    weights.update({f"block{i}": torch.randn(256, 128, generator=g) / math.sqrt(128) for i in range(8)})
    remaining = {n: w.numel() for n, w in weights.items()}
    plain = {n: irrelevance(1.0, w, None) for n, w in weights.items()}
    fair = {n: irrelevance(1.0, w, None, "fan_in") for n, w in weights.items()}
    assert weights_to_prune(ones(*weights), remaining, plain)["stem"] == remaining["stem"]
    counts = weights_to_prune(ones(*weights), remaining, fair)
    assert max(counts.values()) < remaining["block0"]  # nobody emptied
    # even irrelevances split the budget evenly by count (not by fraction): the stem loses a fifth
    assert all(abs(counts["stem"] - c) < 0.1 * c for c in counts.values())
