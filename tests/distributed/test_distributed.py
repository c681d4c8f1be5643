"""Measure and prune in 2 and 3 gloo processes against one process (tests/distributed/worker.py):
bit-identical statistics, masks, weights and accuracies; every failure on one rank raised as the
same error on all ranks, never a hang (every run is bounded by a timeout)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import equal as _equal
from tests.distributed.harness import launch
from tests.distributed.harness import ok as _ok
from tests.distributed.worker import ON_REQUEST


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def runs(base) -> dict[int, dict[str, list[dict]]]:
    return {world: launch(world, base / f"world{world}") for world in (0, 2, 3)}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("scenario", ["measure", "prune_same_retrain"])
def test_ranks_match_one_process_bit_for_bit(runs, world, scenario):
    """Unequal shards (with 3 ranks one holds only empty batches): the same histograms, entropies,
    masks, weights and accuracies as one process over all the data."""
    single = _ok(runs[0][scenario][0])
    for r, result in enumerate(runs[world][scenario]):
        _equal(_ok(result), single, f"rank {r}")


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_retraining_keeps_every_rank_identical(runs, world):
    results = [_ok(r) for r in runs[world]["prune_ddp_retrain"]]
    assert results[0]["records"][-1][2] > 0  # it pruned
    for r, result in enumerate(results[1:], 1):
        _equal(result, results[0], f"rank {r}")


@pytest.mark.parametrize("scenario, match", [
    ("measure_nan_on_rank_1", r"measure failed on 1 of \d rank\(s\).*rank 1: NonFiniteActivationError"),
    ("measure_no_batches_on_last_rank", r"measure failed on 1 of \d rank\(s\).*no batches"),
    ("prune_retrain_without_ddp", r"the weights after retrain \(iteration 1\) differ between ranks.*"
                                  r"DistributedDataParallel"),
    ("prune_evaluate_fails_on_rank_1", r"evaluate \(iteration 1\) failed on 1 of \d rank\(s\).*rank 1: ValueError: "
                                       r"validation shard is corrupt"),
])
@pytest.mark.parametrize("world", [2, 3])
def test_a_failure_on_one_rank_is_the_same_error_on_every_rank(runs, world, scenario, match):
    results = runs[world][scenario]
    assert all(r.get("error") == "RankError" for r in results), results
    assert len({r["message"] for r in results}) == 1
    assert re.search(match, results[0]["message"]), results[0]["message"]


@pytest.mark.parametrize("world", [2, 3])
def test_decisions_are_taken_together(runs, world):
    # one rank's diverged retraining: every rank backs off the same way
    diverged = [_ok(r) for r in runs[world]["prune_retrain_diverges_on_rank_1"]]
    assert any("rank 1: retraining diverged" in str(rec[4]) for rec in diverged[0]["records"]) or \
        "rank 1: retraining diverged" in diverged[0]["stop"]
    # each rank's own shard accuracy: the loop decides with their mean, identically everywhere
    per_rank = [_ok(r) for r in runs[world]["prune_per_rank_accuracy"]]
    for results in (diverged, per_rank):
        for r, result in enumerate(results[1:], 1):
            _equal(result, results[0], f"rank {r}")


@pytest.mark.parametrize("world", [2, 3])
def test_rank_zero_writes_and_every_rank_resumes(runs, world):
    results = [_ok(r) for r in runs[world]["prune_with_checkpoints_then_resume"]]
    single = _ok(runs[0]["prune_with_checkpoints_then_resume"][0])
    for r, result in enumerate(results):
        assert result["files"] == ["iter_000.pt", "iter_001.pt", "iter_002.pt", "iter_003.pt", "summary.json"]
        _equal(result["again"][:3], result["first"], f"rank {r}: resumed records")
        _equal({k: result[k] for k in ("again", "masks")}, {k: single[k] for k in ("again", "masks")}, f"rank {r}")


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_sharded_pruning_step_gives_one_process_masks(runs, world):
    """FSDP2 (fully_shard): NEPENTHE (each layer gathered alone for its selection) and IMP (the
    global threshold from summed per-slice counts, no layer gathered for it) give, gathered, the
    masks and weights of one process on the same data."""
    single = _ok(runs[0]["fsdp_prune_step"][0])
    assert all(sum(single[m]["pruned"].values()) > 0 for m in ("nepenthe", "imp"))
    for r, result in enumerate(runs[world]["fsdp_prune_step"]):
        _equal(_ok(result), single, f"rank {r}")


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_loop_keeps_every_rank_in_step(runs, world):
    """The loop on an FSDP2 model, retrained through it: the ranks agree on every record and hold
    (gathered) the same masks and weights; with 2 ranks they equal one process (averaging two equal
    gradients is exact)."""
    results = [_ok(r) for r in runs[world]["fsdp_prune_loop"]]
    assert results[0]["records"][-1][1] > 0
    for r, result in enumerate(results[1:], 1):
        _equal(result, results[0], f"rank {r}")
    if world == 2:
        _equal(results[0], _ok(runs[0]["fsdp_prune_loop"][0]), "one process")


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_checkpoints_are_written_whole_and_every_rank_resumes(runs, base, world):
    """FSDP2 with checkpoint_dir: rank 0 writes the whole tensors (gathered from every rank), every
    rank resumes its shards from them; the ranks agree, and with 2 ranks equal one process — records,
    (gathered) masks and weights, and the model state in the files themselves."""
    results = [_ok(r) for r in runs[world]["fsdp_prune_with_checkpoints_then_resume"]]
    assert results[0]["again"][-1][2] > 0  # it pruned
    for r, result in enumerate(results):
        assert result["files"] == ["iter_000.pt", "iter_001.pt", "iter_002.pt", "iter_003.pt", "summary.json"]
        _equal(result["again"][:3], result["first"], f"rank {r}: resumed records")
        _equal(result, results[0], f"rank {r}")
    if world == 2:
        _equal(results[0], _ok(runs[0]["fsdp_prune_with_checkpoints_then_resume"][0]), "one process")
        for k in range(4):
            sharded, single = (torch.load(base / f"world{w}" / "fsdp_checkpoints" / f"iter_{k:03d}.pt")["model"]
                               for w in (2, 0))
            assert list(sharded) == list(single), f"iter_{k:03d}.pt: keys"
            assert any(key.endswith("_mask") for key in sharded) == (k > 0)
            _equal(sharded, single, f"iter_{k:03d}.pt")  # plain whole tensors, masks included


def test_fsdp2_checkpoint_resumes_in_one_process(runs, base):
    """Iterations 0-2 written by the 2-rank FSDP2 run, resumed on the unsharded model in one process:
    the result of the one-process run."""
    out = base / "world2_resumed_in_one_process"
    resumed = launch(0, out, scenarios=ON_REQUEST, NEPENTHE_RESUME_FROM=str(base / "world2" / "fsdp_checkpoints"))
    result = _ok(resumed["fsdp_checkpoint_resumed_in_one_process"][0])
    single = _ok(runs[0]["fsdp_prune_with_checkpoints_then_resume"][0])
    _equal(result, {"records": single["again"], **{k: single[k] for k in ("selected", "stop", "masks", "weights")}})
