"""Bit-packed masks on FSDP2-sharded models (2 gloo processes) and pruning on an HSDP mesh (4
processes, (replicate, shard) = (2, 2)) against one process (tests/distributed/scenarios_packed_fsdp.py):
the same masks, counts, weights, records and checkpoint files; each rank stores 1/8 byte per local
weight for its masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed import scenarios_packed_fsdp as scenarios
from tests.distributed.harness import equal as _equal
from tests.distributed.harness import launch
from tests.distributed.harness import ok as _ok

MODULE = "tests.distributed.scenarios_packed_fsdp"
PACKED_BYTES = 0.125 + 0.01  # a bit per local weight (+ the last byte of each layer's slice)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("packed_fsdp")


@pytest.fixture(scope="module")
def runs(base) -> dict[int, dict[str, list[dict]]]:
    return {0: launch(0, base / "world0", module=MODULE),
            2: launch(2, base / "world2", module=MODULE, scenarios=scenarios.FSDP),
            4: launch(4, base / "world4", module=MODULE, scenarios=scenarios.HSDP)}


def _without(result: dict, *keys: str) -> dict:
    return {k: v for k, v in result.items() if k not in keys}


def _packed_storage(storage: dict) -> None:
    assert storage["dtypes"] == ["torch.uint8"] and not storage["dtensor"], storage
    assert storage["bytes_per_weight"] <= PACKED_BYTES, storage


def test_packed_fsdp_prune_step_gives_one_process_masks(runs):
    """NEPENTHE and IMP on 2 ranks with packed masks: gathered, the masks, kept counts and weights of
    one process; each rank holds only its slice's bits."""
    single = _ok(runs[0]["packed_fsdp_prune_step"][0])
    assert all(sum(single[m]["pruned"].values()) > 0 for m in ("nepenthe", "imp"))
    for r, result in enumerate(runs[2]["packed_fsdp_prune_step"]):
        result = _ok(result)
        for method in ("nepenthe", "imp"):
            _equal(_without(result[method], "storage"), _without(single[method], "storage"), f"rank {r}: {method}")
            _packed_storage(result[method]["storage"])


def test_packed_fsdp_loop_equals_one_process(runs):
    single = _ok(runs[0]["packed_fsdp_prune_loop"][0])
    assert single["records"][-1][2] > 0
    for r, result in enumerate(runs[2]["packed_fsdp_prune_loop"]):
        result = _ok(result)
        _equal(_without(result, "storage"), _without(single, "storage"), f"rank {r}")
        _packed_storage(result["storage"])


def test_packed_fsdp_checkpoints_are_the_one_process_files_and_resume(runs, base):
    """Rank 0 writes the whole tensors' packed masks: every file holds the keys and tensors of the
    one-process packed run's; every rank resumes its slices from them, as one process does."""
    single = _ok(runs[0]["packed_fsdp_checkpoints_then_resume"][0])
    for r, result in enumerate(runs[2]["packed_fsdp_checkpoints_then_resume"]):
        result = _ok(result)
        assert result["files"] == ["iter_000.pt", "iter_001.pt", "iter_002.pt", "iter_003.pt", "summary.json"]
        _equal(result["again"][:3], result["first"], f"rank {r}: resumed records")
        _equal(_without(result, "storage"), _without(single, "storage"), f"rank {r}")
        _packed_storage(result["storage"])
    for k in range(4):
        sharded, one = (torch.load(base / f"world{w}" / "packed_fsdp_checkpoints" / f"iter_{k:03d}.pt")["model"]
                        for w in (2, 0))
        assert list(sharded) == list(one), f"iter_{k:03d}.pt: keys"
        assert any(key.endswith("_mask_bits") for key in sharded) == (k > 0)
        assert not any(key.endswith("_mask") for key in sharded)
        _equal(sharded, one, f"iter_{k:03d}.pt")  # plain whole tensors, whole packed masks included


def test_packed_fsdp_snapshots_restore_and_repack(runs):
    """A Pruner snapshot of packed sharded masks restores them; unpack_masks_ gives sharded bool masks
    (DTensors) with the same content and pack_masks_ packs them again."""
    single = _ok(runs[0]["packed_fsdp_snapshot_restore"][0])
    for r, result in enumerate(runs[2]["packed_fsdp_snapshot_restore"]):
        result = _ok(result)
        assert not all(torch.equal(result["first"]["masks"][k], v) for k, v in result["second"]["masks"].items())
        for key in ("restored", "unpacked", "packed_again"):
            _equal(result[key], result["first"], f"rank {r}: {key}")
        _packed_storage(result["storage"])
        assert result["bool_storage"]["dtypes"] == ["torch.bool"] and result["bool_storage"]["dtensor"]
        _equal(_without(result, "storage", "bool_storage"), _without(single, "storage", "bool_storage"), f"rank {r}")


def test_fused_masked_optimizers_step_fsdp2_slices(runs):
    """MaskedSGD / MaskedAdamW on FSDP2 parameters with bool (DTensor) and packed (per-rank) masks: each
    rank steps its own slices; the masked weights stay zero and the result is one process's."""
    single = _ok(runs[0]["fsdp_fused_optimizers"][0])
    for r, result in enumerate(runs[2]["fsdp_fused_optimizers"]):
        result = _ok(result)
        assert all(not v["revived"] for v in result.values()), result
        _equal(result, single, f"rank {r}")


def test_hsdp_prune_step_gives_one_process_masks(runs):
    """A (replicate, shard) mesh of 2 x 2 ranks: NEPENTHE and IMP, bool and packed masks, give the
    masks, kept counts and weights of one process (counts summed over the shard dimension only)."""
    single = _ok(runs[0]["hsdp_prune_step"][0])
    assert all(sum(v["pruned"].values()) > 0 for v in single.values())
    for r, result in enumerate(runs[4]["hsdp_prune_step"]):
        _equal(_ok(result), single, f"rank {r}")


def test_hsdp_loop_checkpoints_and_resume_equal_one_process(runs, base):
    """The loop with packed masks and checkpoints on the HSDP mesh, resumed: every rank agrees on every
    record and holds (gathered) the masks and weights of one process; the files are one process's."""
    results = [_ok(r) for r in runs[4]["hsdp_prune_loop"]]
    assert results[0]["records"][-1][2] > 0
    assert results[0]["files"] == ["iter_000.pt", "iter_001.pt", "iter_002.pt", "iter_003.pt", "summary.json"]
    _equal(results[0]["records"][:3], results[0]["first"], "resumed records")
    for r, result in enumerate(results[1:], 1):
        _equal(result, results[0], f"rank {r}")
    _equal(results[0], _ok(runs[0]["hsdp_prune_loop"][0]), "one process")
    for k in range(4):
        sharded, one = (torch.load(base / f"world{w}" / "hsdp_checkpoints" / f"iter_{k:03d}.pt")["model"]
                        for w in (4, 0))
        assert list(sharded) == list(one), f"iter_{k:03d}.pt: keys"
        _equal(sharded, one, f"iter_{k:03d}.pt")


def _saved_by_distributed_checkpoint(single: dict, results: list) -> None:
    _equal(single["loaded"], single["saved"], "one process")
    _equal(single["cut"], single["saved"]["masks"], "one process: whole bits loaded")
    assert single["refused"] is None
    results = [_ok(r) for r in results]
    for r, result in enumerate(results):
        _equal(result["loaded"], result["saved"], f"rank {r}: loaded in place")
        _equal(result["cut"], result["saved"]["masks"], f"rank {r}: whole bits through load_state_dict")
        _equal(result["saved"], single["saved"], f"rank {r}: saved")
        _packed_storage(result["storage"])
        assert "one row of bits per slice" in result["refused"], result["refused"]
        # every row as long as the largest slice's bits: the same bytes on every rank, rank 0's slices the largest
        assert result["storage"]["held_bytes"] == results[0]["storage"]["held_bytes"]
    assert results[0]["storage"]["held_bytes"] / results[0]["storage"]["weights"] <= PACKED_BYTES


def test_packed_fsdp_saved_by_distributed_checkpoint_as_it_is(runs):
    """torch.distributed.checkpoint saves a packed FSDP2 model as it is (every rank's own bits) and loads
    it in place; a one-process checkpoint's whole bits load through load_state_dict on 2 ranks; a plain
    model refuses the per-slice bits (tests/distributed/scenarios_packed_fsdp.py)."""
    _saved_by_distributed_checkpoint(_ok(runs[0]["packed_fsdp_distributed_checkpoint"][0]),
                                     runs[2]["packed_fsdp_distributed_checkpoint"])


def test_packed_hsdp_saved_by_distributed_checkpoint_as_it_is(runs):
    """The same on the (replicate, shard) mesh of 2 x 2 ranks: rows per slice over the shard dimension."""
    _saved_by_distributed_checkpoint(_ok(runs[0]["packed_hsdp_distributed_checkpoint"][0]),
                                     runs[4]["packed_hsdp_distributed_checkpoint"])
