"""A run SIGKILLed at random points of every phase and resumed until done ends byte for byte as the
uninterrupted run (masks, weights, checkpoints, reports; timings aside): the README pattern, the
``nepenthe run`` command and the experiment runner. The runs are driven by
``tests/loop/resume_driver.py`` in one subprocess (it forks a child per run after the imports).
In-process tests cover what the checkpoints keep (random states, the stop reason) and how a
malformed one is refused."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from nepenthe import PruneConfig, prune
from nepenthe.checkpoint import payload_checksum, rng_state, set_rng_state
from nepenthe.data import ImageTensorDataset, make_loader, unaugmented
from nepenthe.data.augment import Augment
from nepenthe.errors import CheckpointError
from nepenthe.train import TrainConfig, evaluate, train

ROOT = Path(__file__).resolve().parents[2]
# job:kills per phase:chains (resume_driver.campaign): the README pattern killed 8 times in each phase,
# one chain per phase; nepenthe run and the experiment runner once per phase (8 and 7 phases), each in
# one chain of runs resuming the last; the control: the README pattern without restoring random states
CAMPAIGNS = ["loop:8:phase", "cli:1:mixed", "experiment:1:mixed", "loop:2:control"]
# what differs between two uninterrupted runs: time, what timing decides, and the checksum over them
TIMING = {"seconds", "prune_seconds", "fold_seconds", "wall_seconds", "latency", "latency_ms", "latency_ms_before",
          "latency_ms_after", "latency_speedup", "speedup", "fold_share_of_prune", "environment", "checksum"}
# tables of results.json (compared) with its timing columns
DERIVED = {"results.csv", "results.md"}


def _normal(obj, seeded: bool):
    """``obj`` without timings, as values a checksum covers (tensors byte for byte). ``seeded``
    False: a job that neither seeds nor draws from numpy / ``random`` (a new process's states, which
    the checkpoints keep, are arbitrary)."""
    if isinstance(obj, dict):
        unseeded = set() if seeded or not {"torch", "numpy", "python", "generators"} <= set(obj) else {"numpy",
                                                                                                      "python"}
        return {k: _normal(v, seeded) for k, v in obj.items() if k not in TIMING | unseeded}
    if isinstance(obj, (list, tuple)):
        return [_normal(v, seeded) for v in obj]
    return obj


def content(folder: Path, seeded: bool) -> dict[str, str]:
    """Relative path -> digest of every output file (JSON and torch files without their timings;
    anything else, e.g. the plots, as raw bytes). Temporary files of killed writes are left out."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = str(path.relative_to(folder))
        if rel == "counts.json" or path.name.endswith(".tmp") or path.name in DERIVED:
            continue
        if path.suffix == ".json":
            obj = json.loads(path.read_text())
        elif path.suffix == ".pt":
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            obj = path.read_bytes().hex()
        out[rel] = payload_checksum(_normal(obj, seeded))
    return out


def differences(ref: Path, other: Path, seeded: bool = True) -> list[str]:
    a, b = content(ref, seeded), content(other, seeded)
    return [f"{k}: {'missing' if k not in b else 'extra' if k not in a else 'differs'}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


@pytest.fixture(scope="module")
def campaigns(tmp_path_factory):
    work = tmp_path_factory.mktemp("resume")
    done = subprocess.run([sys.executable, "-m", "tests.loop.resume_driver", str(work), "20260514", *CAMPAIGNS],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check(log: dict, job: str, per_phase: int, seeded: bool = True) -> None:
    ref = Path(log["chains"][next(iter(log["chains"]))]).parent / "ref"
    assert differences(ref, ref.parent / "again", seeded) == [], f"{job}: two uninterrupted runs differ"
    for phase, killed in log["kills"].items():
        assert len(killed) >= per_phase, f"{job}: only {len(killed)} kills in {phase}: {killed}"
    for name, folder in log["chains"].items():
        assert differences(ref, Path(folder), seeded) == [], f"{job}: killed in {name} and resumed, the outputs differ"


@pytest.mark.slow
def test_readme_pattern_resumes_identically_from_kills_in_every_phase(campaigns):
    """``nepenthe.prune`` with a user retrain (own-generator shuffling, dropout, numpy and random
    draws) and a checkpoint folder, killed 8 times in each of measure, prune, retrain, evaluate,
    checkpoint write and summary write; it stops by delta after a back-off, so the stop reason
    comes back from a checkpoint too."""
    log = campaigns["loop:8:phase"]
    _check(log, "README pattern", 8)
    report = json.loads((Path(log["chains"]["retrain"]) / "report.json").read_text())
    assert "fell below" in report["stop_reason"] and "(resumed)" not in report["stop_reason"]
    assert any(r["backoffs"] for r in report["iterations"])


@pytest.mark.slow
def test_cli_run_resumes_identically(campaigns):
    """``nepenthe run`` killed in dense training, measure, prune, retrain, evaluate, checkpoint
    write, fold and report writes (one chain, each run resuming the last)."""
    _check(campaigns["cli:1:mixed"], "nepenthe run", 1, seeded=False)


@pytest.mark.slow
def test_experiment_runner_resumes_identically(campaigns):
    _check(campaigns["experiment:1:mixed"], "experiment", 1, seeded=False)


@pytest.mark.slow
def test_without_restoring_the_random_states_a_resume_differs(campaigns):
    """The bug this guards: resumed with the random states as the new process has them, the
    retraining draws other batches and dropout masks, and the result differs."""
    log = campaigns["loop:2:control"]
    ref = Path(log["chains"]["retrain"]).parent / "ref"
    assert log["kills"]["retrain"]
    assert any("model.pt" in d for d in differences(ref, Path(log["chains"]["retrain"])))


# --------------------------------------------------------------------------------------------------
# In process: what a checkpoint keeps, and what a resume refuses
# --------------------------------------------------------------------------------------------------


class Crash(Exception):
    pass


def augmented_job(folder: Path, crash_at: int | None = None, pass_loader: bool = True, max_iters: int = 3):
    """A script as a user writes it: seeded, an augmenting image split (its dataset owns the
    augmentation generator) shuffled by the loader's own generator, dropout; ``crash_at``: the
    retraining of that iteration dies, as a killed process would."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    images, labels = torch.randint(0, 256, (96, 3, 6, 6), dtype=torch.uint8, generator=g), torch.arange(96) % 3
    split = ImageTensorDataset(images, labels, (0.5,) * 3, (0.25,) * 3, augment=Augment(crop_padding=1), seed=3)
    loader, calib = make_loader(split, 16, shuffle=True, seed=1), make_loader(unaugmented(split), 48)
    model = nn.Sequential(nn.Flatten(), nn.Linear(108, 24), nn.ReLU(), nn.Dropout(0.3), nn.Linear(24, 3))

    def retrain(m, iteration):
        if iteration == crash_at:
            raise Crash
        train(m, loader, TrainConfig(epochs=1, lr=0.05))

    result = prune(model, calib, retrain=retrain, evaluate=lambda m: evaluate(m, calib),
                   config=PruneConfig(max_iters=max_iters, delta=None, metric_scale=1, checkpoint_dir=str(folder)),
                   rng_generators=[loader] if pass_loader else ())
    return model, result


def _untimed(result):
    return [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in result.iterations]


@pytest.mark.parametrize("pass_loader", [True, False])
def test_resume_restores_the_loaders_and_augmentations_generators(tmp_path, pass_loader):
    reference, ref_result = augmented_job(tmp_path / "ref")
    with pytest.raises(Crash):
        augmented_job(tmp_path / "run", crash_at=2, pass_loader=pass_loader)
    torch.manual_seed(12345)  # whatever the process drew in between
    model, result = augmented_job(tmp_path / "run", pass_loader=pass_loader)
    same = all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), model.state_dict().values()))
    # without its generators (the loader's shuffling, the split's augmentations) the retraining sees
    # other batches: what the loop cannot know about, it cannot put back
    assert same is pass_loader
    if pass_loader:
        assert _untimed(result) == _untimed(ref_result)


def test_saved_random_states_give_the_same_draws_again():
    g = torch.Generator().manual_seed(3)
    draw = lambda: (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random(),  # noqa: E731
                    torch.rand(3, generator=g).tolist(), float(np.random.randn()))
    saved = rng_state([g])
    first = draw()
    set_rng_state(torch.load(_roundtrip(saved), weights_only=True), [g], where="memory")
    assert draw() == first


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def _tamper(path: Path, change) -> None:
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    ckpt["checksum"] = payload_checksum(ckpt)  # a consistent file: only the content is wrong
    torch.save(ckpt, path)


@pytest.mark.parametrize("change, key", [
    (lambda c: c["rng"][0].update(torch=torch.zeros(7, dtype=torch.uint8)), "'torch'"),
    (lambda c: c["rng"][0].update(torch=c["rng"][0]["torch"].float()), "'torch'"),
    (lambda c: c["rng"][0].update(torch=torch.zeros_like(c["rng"][0]["torch"])), "'torch'"),
    (lambda c: c["rng"][0]["numpy"].update(keys=c["rng"][0]["numpy"]["keys"] + 2**33), "'numpy.keys'"),
    (lambda c: c["rng"][0]["numpy"].update(pos=10**6), "'numpy.pos'"),
    (lambda c: c["rng"][0]["python"].update(words="not a tensor"), "'python.words'"),
    (lambda c: c["rng"][0]["generators"].__setitem__(0, torch.zeros(3, dtype=torch.int64)), "'generators[0]'"),
    (lambda c: c["rng"][0]["generators"].pop(), "generator(s)"),
    (lambda c: c.update(rng="pickle me"), "'rng'"),
    (lambda c: c.update(stop_reason=3), "'stop_reason'"),
])
def test_a_malformed_checkpoint_state_is_refused_naming_the_file_and_key(tmp_path, change, key):
    augmented_job(tmp_path, max_iters=1)  # iteration 1 stops nothing: a resume continues after it
    _tamper(tmp_path / "iter_001.pt", change)
    if key == "'stop_reason'":  # read only for the iteration that stopped the loop
        _tamper(tmp_path / "iter_001.pt", lambda c: c["record"].update(within_tolerance=False, failure="x"))
    with pytest.raises(CheckpointError) as info:
        augmented_job(tmp_path, max_iters=2)
    message = str(info.value)
    assert str(tmp_path / "iter_001.pt") in message and key in message and "start over" in message


def test_generators_of_the_wrong_kind_are_refused(tmp_path):
    with pytest.raises(TypeError, match="rng_generators takes torch.Generator"):
        prune(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)), [torch.zeros(1, 2)], retrain=None,
              evaluate=None, rng_generators=[42])


def test_a_checkpoint_of_an_older_format_resumes_with_a_warning(tmp_path):
    augmented_job(tmp_path, max_iters=1)
    _tamper(tmp_path / "iter_001.pt", lambda c: c.pop("rng"))
    with pytest.warns(RuntimeWarning, match=r"iter_001\.pt holds no random states"):
        augmented_job(tmp_path, max_iters=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_cuda_states_without_cuda_resume_with_a_warning(tmp_path):
    augmented_job(tmp_path, max_iters=1)
    _tamper(tmp_path / "iter_001.pt", lambda c: c["rng"][0].update(cuda=[torch.zeros(16, dtype=torch.uint8)]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        augmented_job(tmp_path, max_iters=2)
    assert any("1 CUDA device(s), this machine has 0" in str(w.message) for w in caught)


def test_the_stop_reason_of_an_older_checkpoint_is_rebuilt_from_its_record(tmp_path):
    """A /2 checkpoint has no stop reason: the same text comes back from the record (not "(resumed)")."""
    def job(folder, **kw):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        scores = iter([90.0, 80.0, 70.0])
        return prune(model, [torch.randn(8, 4)], retrain=lambda m, it: None, evaluate=lambda m: next(scores),
                     config=PruneConfig(max_iters=3, delta=1.0, max_backoffs=1, metric_scale=1,
                                        checkpoint_dir=str(folder)), **kw)
    first = job(tmp_path)
    assert "after 1 back-off(s)" in first.stop_reason
    _tamper(tmp_path / "iter_001.pt", lambda c: c.pop("stop_reason"))
    assert job(tmp_path).stop_reason == first.stop_reason
