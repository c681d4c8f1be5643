"""``nepenthe run`` and ``nepenthe experiment`` launched by torchrun with 2 gloo processes: one
report written by rank 0 only, a folded model that loads, a rerun that resumes from rank 0's
checkpoints without rewriting them, and a failure on every rank that ends every rank (no hang)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nepenthe import load
from tests.experiment.smallest import smallest_experiment_toml

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 180  # one launch takes ~15 s on 2 busy cores; a hang fails the test instead of blocking it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "nepenthe", *args]
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s (a hang):\n{(exc.stderr or '')[-3000:]}")


RUN = ("run", "--dataset", "digits", "--model", "mlp", "--epochs", "2", "--retrain-epochs", "1", "--iters", "2",
       "--no-progress", "--threads", "1")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted 2-process run."""
    tmp_path = tmp_path_factory.mktemp("torchrun")
    out = tmp_path / "run"
    return out, _torchrun(*RUN, "--out", str(out), cwd=tmp_path)


def _decided(report: dict) -> list:
    """What each iteration decided (no timings)."""
    return [{k: r[k] for k in ("iteration", "accuracy", "sparsity", "layer_entropy", "within_tolerance")}
            for r in report["iterations"]]


def test_run_writes_one_report_and_resumes(finished, tmp_path):
    out, first = finished
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count("wrote ") == 1  # rank 0 speaks for both
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["dataset"] == "digits"
    for key in ("dense_accuracy", "pruned_accuracy", "folded_accuracy"):
        assert 50.0 < report[key] <= 100.0, (key, report[key])
    assert [r["iteration"] for r in report["iterations"]] == [0, 1, 2]
    assert 0.0 < report["sparsity"] < 1.0 and report["latency_ms_before"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "entropy.png", "folded", "report.json",
                                                    "run_config.json"]
    x = torch.zeros(3, 64)
    assert load(out / "folded")(x).shape == (3, 10)

    checkpoints = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").glob("iter_*.pt")}
    assert sorted(checkpoints) == ["iter_000.pt", "iter_001.pt", "iter_002.pt"]
    again = _torchrun(*RUN, "--out", str(out), cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").glob("iter_*.pt")} == checkpoints
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["iterations"] == report["iterations"]  # read back from rank 0's checkpoints, timings and all
    assert resumed["dense_accuracy"] == report["dense_accuracy"]  # the seeded DDP dense training is redone alike


def test_three_processes(tmp_path):
    """3 ranks (the DistributedSampler pads the 3rd shard): one report with world_size 3, a folded
    model that loads."""
    out = tmp_path / "run3"
    result = _torchrun(*RUN[:10], "1", *RUN[11:], "--out", str(out), cwd=tmp_path, nproc=3)  # --iters 1
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 3 and [r["iteration"] for r in report["iterations"]] == [0, 1]
    assert 50.0 < report["folded_accuracy"] <= 100.0
    assert load(out / "folded")(torch.zeros(3, 64)).shape == (3, 10)


def test_a_killed_run_resumes_from_rank_zeros_checkpoints(finished, tmp_path):
    """SIGKILL to torchrun and both ranks once iteration 1 is written; the rerun ends as the
    uninterrupted run (what every iteration decided) without rewriting the checkpoints it read."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "nepenthe", *RUN, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (out / "checkpoints" / "iter_001.pt").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "iteration 1 was never written"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").glob("iter_*.pt")}
    assert "iter_001.pt" in kept and not (out / "report.json").exists()
    again = _torchrun(*RUN, "--out", str(out), cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    now = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").glob("iter_*.pt")}
    assert {k: now[k] for k in kept} == kept and sorted(now) == ["iter_000.pt", "iter_001.pt", "iter_002.pt"]
    assert _decided(json.loads((out / "report.json").read_text())) == \
        _decided(json.loads((finished[0] / "report.json").read_text()))


def test_a_failure_on_every_rank_ends_every_rank(tmp_path):
    result = _torchrun("run", "--dataset", "fashion-mnist", "--data-root", str(tmp_path / "missing"), "--epochs", "1",
                       "--no-progress", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode != 0
    # each rank prints the same one line (exit status 2, as one process; torchrun may end the second
    # rank before it prints once the first has exited)
    lines = {line[line.index("nepenthe run: error:"):] for line in result.stderr.splitlines()
             if "nepenthe run: error:" in line}
    assert len(lines) == 1, result.stderr[-3000:]
    line = lines.pop()
    assert "failed on every rank (2)" in line and "does not exist" in line, line
    assert "exitcode  : 2" in result.stderr
    # (torchrun itself then prints its ChildFailedError traceback: the ranks printed only the line above)


TINY = smallest_experiment_toml("tiny-ddp", [0], ["nepenthe", "easier"], batch_size=20)


def test_experiment_runs_under_torchrun(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    out = tmp_path / "exp"
    result = _torchrun("experiment", "tiny.toml", "--out", str(out), "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("| easier |") == 1
    results = json.loads((out / "results.json").read_text())
    assert [(r["seed"], r["method"]) for r in results["runs"]] == [(0, "nepenthe"), (0, "easier")]
    for row in results["runs"]:
        assert 0.0 <= row["folded_test"] <= 100.0 and row["iterations"][0]["iteration"] == 0
        assert (out / "seed0" / row["method"] / "folded").is_dir()
    # the runs share one dense model, trained once through DDP and written by rank 0
    assert (out / "seed0" / "dense.pt").exists()
    assert len({row["dense_test"] for row in results["runs"]}) == 1
