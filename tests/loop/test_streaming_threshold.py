"""The streamed magnitude selection (``nepenthe.budget.magnitude_threshold`` and the
``magnitude_mask`` built on it) picks exactly the weights a stable float64 sort picked, ties
included, and its partial counts combine by a sum (the FSDP / multi-process case)."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from nepenthe import budget
from nepenthe.budget import global_magnitude_counts, global_magnitude_masks, magnitude_mask, magnitude_threshold


# ----- the sort-based selection this replaced, kept verbatim as the oracle ------------------------
def sorted_magnitude_mask(weight, mask, n_prune):
    keep = (torch.ones(weight.shape, dtype=torch.bool, device=weight.device) if mask is None
            else mask.clone(memory_format=torch.contiguous_format))
    if n_prune <= 0:
        return keep
    flat_keep = keep.reshape(-1)
    alive = flat_keep.nonzero().squeeze(1)
    if n_prune >= alive.numel():
        flat_keep.zero_()
        return keep
    magnitudes = weight.detach().reshape(-1)[alive].abs().to(torch.float64)
    order = torch.sort(magnitudes, stable=True).indices
    flat_keep[alive[order[:n_prune]]] = False
    return keep


def sorted_global_counts(weights, masks, fraction, limits=None):
    alive = {n: (torch.ones_like(w, dtype=torch.bool) if masks.get(n) is None else masks[n])
             for n, w in weights.items()}
    values = torch.cat([weights[n].detach().abs().to(torch.float64)[alive[n]].reshape(-1) for n in weights])
    n_prune = math.floor(fraction * values.numel())
    if n_prune == 0:
        return {n: 0 for n in weights}
    sizes = torch.tensor([int(alive[n].sum()) for n in weights], dtype=torch.int64)
    owners = torch.repeat_interleave(torch.arange(len(weights)), sizes)
    order = torch.sort(values, stable=True).indices
    if limits is not None:
        cap = torch.tensor([min(int(limits.get(n, s)), int(s)) for n, s in zip(weights, sizes.tolist())])
        sorted_owners = owners[order]
        by_owner = torch.sort(sorted_owners, stable=True)
        starts = torch.cumsum(sizes, 0) - sizes
        rank = torch.empty_like(order)
        rank[by_owner.indices] = torch.arange(len(order)) - starts[by_owner.values]
        order = order[rank < cap[sorted_owners]]
    order = order[:n_prune]
    counts = torch.zeros(len(weights), dtype=torch.int64)
    counts.index_add_(0, owners[order], torch.ones_like(order))
    return {n: int(c) for n, c in zip(weights, counts)}


# ----- random models: few distinct magnitudes (ties), zeros of both signs, masks, half dtypes -------
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _tensor(gen, shape, dtype, special):
    kind = int(torch.randint(3, (), generator=gen))
    if kind == 0:  # a handful of levels: many ties, both signs, +0.0 and -0.0
        x = torch.randint(-3, 4, shape, generator=gen).to(torch.float64) * 0.125
        x[torch.rand(shape, generator=gen) < 0.1] = -0.0
    elif kind == 1:  # continuous values, rounded by the dtype (fp16 / bf16 make ties of their own)
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
    else:  # tiny magnitudes: subnormals in fp16, zeros after rounding in bf16
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 1e-6
    x = x.to(dtype)
    if special and x.numel():
        flat = x.view(-1)
        picks = torch.randint(flat.numel(), (3,), generator=gen)
        flat[picks[0]], flat[picks[1]], flat[picks[2]] = math.inf, -math.inf, math.nan
    return x


def random_model(seed, special=False):
    gen = torch.Generator().manual_seed(seed)
    n_layers = int(torch.randint(1, 6, (), generator=gen))
    mixed = bool(torch.randint(2, (), generator=gen))
    one = DTYPES[int(torch.randint(4, (), generator=gen))]
    weights, masks, limits = {}, {}, {}
    for i in range(n_layers):
        shape = (int(torch.randint(0 if i else 1, 9, (), generator=gen)), int(torch.randint(1, 13, (), generator=gen)))
        dtype = DTYPES[int(torch.randint(4, (), generator=gen))] if mixed else one
        weights[f"l{i}"] = _tensor(gen, shape, dtype, special)
        if torch.rand((), generator=gen) < 0.6:  # masked entries hold arbitrary values: they must not count
            masks[f"l{i}"] = torch.rand(shape, generator=gen) < 0.7
        limits[f"l{i}"] = int(torch.randint(-1, weights[f"l{i}"].numel() + 2, (), generator=gen))
    return weights, masks, limits


def _check_model(weights, masks, limits, every=1):
    for fraction in (0.0, 0.13, 0.5, 0.77, 1.0):
        for lim in (None, limits):
            want = sorted_global_counts(weights, masks, fraction, lim)
            assert global_magnitude_counts(weights, masks, fraction, lim) == want, (fraction, lim)
    for name, w in weights.items():
        for n_prune in range(0, w.numel() + 2, every):
            got = magnitude_mask(w, masks.get(name), n_prune)
            assert torch.equal(got, sorted_magnitude_mask(w, masks.get(name), n_prune)), (name, n_prune)


@pytest.mark.parametrize("seed", range(60))
def test_identical_to_the_sort_on_random_models(seed):
    _check_model(*random_model(seed))


@pytest.mark.parametrize("seed", range(60, 75))
def test_identical_with_inf_and_nan(seed):
    _check_model(*random_model(seed, special=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_identical_across_slices_and_passes(monkeypatch, dtype):
    """Slices smaller than a layer and narrow digits (many passes) change nothing."""
    monkeypatch.setattr(budget, "_CHUNK", 7)
    monkeypatch.setattr(budget, "_DIGIT_BITS", 5)
    gen = torch.Generator().manual_seed(1)
    weights = {f"l{i}": (torch.randint(-20, 21, (6, 9), generator=gen) * 0.01).to(dtype) for i in range(3)}
    masks = {"l1": torch.rand(6, 9, generator=gen) < 0.5}
    _check_model(weights, masks, {"l0": 5, "l2": 40}, every=3)


def test_layouts_and_large_layers():
    gen = torch.Generator().manual_seed(2)
    dense = torch.randint(-50, 51, (64, 32, 3, 3), generator=gen).half()  # 18k weights over 101 levels
    cl = dense.to(memory_format=torch.channels_last)
    mask = (torch.rand(dense.shape, generator=gen) < 0.8).to(memory_format=torch.channels_last)
    for n_prune in (1, 977, 9000, 14000):
        want = sorted_magnitude_mask(cl, mask, n_prune)
        assert torch.equal(magnitude_mask(cl, mask, n_prune), want)
        assert magnitude_mask(cl, mask, n_prune).is_contiguous()
    t = torch.randn(300, 500, generator=gen).t()  # transposed: not contiguous
    assert torch.equal(magnitude_mask(t, None, 40000), sorted_magnitude_mask(t, None, 40000))
    weights = {"a": cl, "b": t.float(), "c": torch.zeros(10, 10)}
    for fraction in (0.1, 0.6):
        want = sorted_global_counts(weights, {"a": mask}, fraction)
        assert global_magnitude_counts(weights, {"a": mask}, fraction) == want
        got = global_magnitude_masks(weights, {"a": mask}, fraction)
        assert all(torch.equal(got[n], sorted_magnitude_mask(weights[n], {"a": mask}.get(n), want[n]))
                   for n in weights)


def test_nans_of_any_payload_rank_last_in_position_order():
    """NaNs are one key above inf, whatever their sign and payload bits: a sort keeps their index order."""
    bits = torch.tensor([0x7FC00000, 0x3F000000, -0x00400000, 0x7F800001, 0x7F800000, 0x7FFFFFFF, 0x00000001, 0],
                        dtype=torch.int32)  # qNaN, 0.5, -qNaN, sNaN, inf, NaN, smallest subnormal, 0
    w = bits.view(torch.float32).reshape(2, 4)
    for n_prune in range(9):
        assert torch.equal(magnitude_mask(w, None, n_prune), sorted_magnitude_mask(w, None, n_prune)), n_prune
    half = torch.tensor([0x7E00, 0x7C01, -0x0200, 0x3800, 0x7C00], dtype=torch.int16).view(torch.float16)
    for n_prune in range(6):
        assert torch.equal(magnitude_mask(half, None, n_prune), sorted_magnitude_mask(half, None, n_prune))


def test_threshold_reports_the_cut():
    w = {"a": torch.tensor([0.5, 0.1, 0.3, 0.3]), "b": torch.tensor([0.3, 0.2, -0.3, 0.9])}
    cut = magnitude_threshold(w, {}, 0.5)  # 4 of 8: 0.1, 0.2 then two of the four 0.3 (layer a first)
    assert cut.value == pytest.approx(0.3) and cut.format == torch.float32
    assert cut.counts == {"a": 3, "b": 1} and cut.below == {"a": 1, "b": 1} and cut.ties == {"a": 2, "b": 2}
    capped = magnitude_threshold(w, {}, 0.5, {"a": 1})  # a gives only its 0.1: b's three 0.3-or-less go
    assert capped.counts == {"a": 1, "b": 3}
    assert magnitude_threshold(w, {}, 0.0).key == -1 and magnitude_threshold(w, {}, 0.0).value == -1.0


# ----- partial counts combine by a sum --------------------------------------------------------------
def _run_ranks(parts, fraction, limits):
    """Each part's magnitude_threshold in its own thread, the ``reduce`` summing their tensors (what
    an all-reduce over processes does)."""
    slots, barrier, results = [None] * len(parts), threading.Barrier(len(parts)), [None] * len(parts)

    def worker(rank):
        def reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = sum(slots)
            barrier.wait()
            return total
        results[rank] = magnitude_threshold(parts[rank][0], parts[rank][1], fraction, limits, reduce)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _shard(weights, masks, rank, ranks):
    """Rank ``rank``'s contiguous slice of every flattened layer (FSDP2 shards dim 0 the same way)."""
    out_w, out_m = {}, {}
    for n, w in weights.items():
        flat = w.reshape(-1)
        size = -(-flat.numel() // ranks)
        out_w[n] = flat[rank * size:(rank + 1) * size]
        if n in masks:
            out_m[n] = masks[n].reshape(-1)[rank * size:(rank + 1) * size]
    return out_w, out_m


@pytest.mark.parametrize("seed", range(12))
def test_sharded_layers_combine_to_the_same_threshold(seed):
    weights, masks, limits = random_model(seed + 100)
    for fraction in (0.2, 0.5, 0.9):
        for lim in (None, limits):
            whole = magnitude_threshold(weights, masks, fraction, lim)
            for r, part in enumerate(_run_ranks([_shard(weights, masks, r, 2) for r in range(2)], fraction, lim)):
                # every rank sees the global cut; the per-layer counts are the single-process ones
                assert (part.key, part.counts, part.below, part.ties) == (
                    whole.key, whole.counts, whole.below, whole.ties), (r, fraction, lim)
            assert whole.counts == sorted_global_counts(weights, masks, fraction, lim)


def test_layers_split_between_ranks_combine():
    """The parameter list split in two (each rank holds some layers, empty tensors for the others)."""
    gen = torch.Generator().manual_seed(5)
    weights = {f"l{i}": (torch.randint(-9, 10, (8, 16), generator=gen) * 0.1) for i in range(4)}
    masks = {"l2": torch.rand(8, 16, generator=gen) < 0.5}
    parts = []
    for rank in range(2):
        mine = {n: (w if i % 2 == rank else w[:0]) for i, (n, w) in enumerate(weights.items())}
        parts.append((mine, {n: (m if n in mine and mine[n].numel() else m[:0]) for n, m in masks.items()}))
    for fraction in (0.3, 0.5):
        whole = magnitude_threshold(weights, masks, fraction)
        for part in _run_ranks(parts, fraction, None):
            assert part.key == whole.key and part.counts == whole.counts
        assert whole.counts == sorted_global_counts(weights, masks, fraction)


def _gloo_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        weights, masks, limits = random_model(223)
        w, m = _shard(weights, masks, rank, world)
        cut = magnitude_threshold(w, m, 0.6, limits, reduce=budget.sum_across_processes())
        torch.save({"key": cut.key, "counts": cut.counts}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="gloo backend unavailable")
def test_sum_across_processes_all_reduces_the_counts(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork starts in well under a second; spawn would re-import torch in every child
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_gloo_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method=method)
    weights, masks, limits = random_model(223)  # five layers of three dtypes, a cap reached
    whole = magnitude_threshold(weights, masks, 0.6, limits)
    assert whole.counts == sorted_global_counts(weights, masks, 0.6, limits) and sum(whole.counts.values()) > 40
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got == {"key": whole.key, "counts": whole.counts}
