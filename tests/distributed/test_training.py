"""``nepenthe.train`` under DDP in 2 gloo processes (tests/distributed/scenarios_training.py): a
failure on one rank in the middle of an epoch — a corrupt sample, a failing forward, a NaN loss,
fewer batches — is the same error on every rank at the same step, never a wait until the group
timeout, and the group goes on working."""

from __future__ import annotations

import re

import pytest

from tests.distributed.harness import launch, ok

MODULE = "tests.distributed.scenarios_training"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, list[dict]]:
    return launch(2, tmp_path_factory.mktemp("training") / "world2", MODULE, timeout_s=180)


def test_ranks_train_in_step_before_and_after_the_failures(results):
    """The same scenario runs first and last (the failures in between left the group usable): every
    rank ends with the same weights."""
    runs = [ok(r) for name in ("train_in_step", "train_in_step_again") for r in results[name]]
    assert runs[0]["losses_len"] == 2 and all(run == runs[0] for run in runs)


@pytest.mark.parametrize("scenario, error, match", [
    ("train_sample_corrupt_on_rank_1", "RankError",
     r"training \(epoch 0\), batch 2, failed on 1 of 2 rank\(s\).*rank 1: ValueError: sample 21 is corrupt"),
    ("train_forward_fails_on_rank_1", "RankError",
     r"training \(epoch 0\), batch 2, failed on 1 of 2 rank\(s\).*rank 1: RuntimeError: CUDA out of memory "
     r"\(simulated\)"),
    ("train_fewer_batches_on_rank_1", "ValueError",
     r"different number of batches on each rank \(rank 0: 6, rank 1: 5\)"),
    ("train_stream_runs_dry_on_rank_1", "RankError",
     r"training \(epoch 0\) failed on 1 of 2 rank\(s\).*rank 1: ValueError: this rank's batches ran out "
     r"after 2 while other ranks had more"),
    ("user_ddp_loop_fails_on_rank_1", "RankError",
     r"my forward failed on 1 of 2 rank\(s\).*rank 1: RuntimeError: CUDA out of memory \(simulated\)"),
    ("prune_retrain_fails_mid_epoch_on_rank_1", "RankError",
     r"training \(epoch 0\), batch 2, failed on 1 of 2 rank\(s\).*rank 1: ValueError: sample 21"),
])
def test_a_failure_mid_epoch_on_one_rank_is_the_same_error_on_every_rank(results, scenario, error, match):
    got = results[scenario]
    assert [r.get("error") for r in got] == [error, error], got
    assert got[0]["message"] == got[1]["message"]
    assert re.search(match, got[0]["message"]), got[0]["message"]


def test_a_nan_loss_on_one_rank_stops_every_rank_as_a_divergence(results):
    rank0, rank1 = results["train_nan_on_rank_1"]
    assert rank0.get("error") == rank1.get("error") == "FloatingPointError"
    assert "loss became NaN/Inf on another rank at epoch 0" in rank0["message"]
    assert "loss became nan at epoch 0" in rank1["message"]
