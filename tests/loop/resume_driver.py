"""Runs a job uninterrupted, then again while SIGKILLing it at chosen points and resuming until it
finishes, for tests/loop/test_resume_identical.py.

    python -m tests.loop.resume_driver WORK SEED JOB:KILLS:MODE [JOB:KILLS:MODE ...]

JOB is ``loop`` (the README pattern: ``nepenthe.prune`` with a user ``retrain`` that shuffles with
its loader's own generator, uses dropout and draws from numpy and ``random``), ``cli``
(``nepenthe run``) or ``experiment`` (the experiment runner); MODE is ``phase``, ``mixed`` or
``control`` (see :func:`campaign`). Every run is a child forked from this process after the imports
(a fresh interpreter per run would cost seconds of imports each); a child reseeds every global
generator from the OS first, as a new process would be, and the job seeds what it seeds.
``WORK/<job>-<mode>/ref`` and ``.../again`` are two uninterrupted runs, the other folders runs killed
and resumed until done. A kill point is a position in the uninterrupted run (the prune call's
checkpoint folder, the iteration in progress, the j-th call of the phase there) and a moment
(before / after the call; for file writes: torn half-way, written but not renamed, or renamed); a
resumed run is killed at the first call of the phase at or after it. Prints one JSON line: the
run folders and every kill.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
import torch._dynamo  # noqa: F401 - the first optimizer imports it (2 s): once here, not in every child
from torch.optim.optimizer import register_optimizer_step_post_hook

import nepenthe
import nepenthe.checkpoint as checkpoint_module
import nepenthe.experiment.runner as runner
import nepenthe.loop.iterate as iterate
import nepenthe.pipeline as pipeline
from nepenthe.cli import main as cli_main
from nepenthe.data import make_loader
from nepenthe.experiment import from_dict, run_experiment
from nepenthe.loop.pruner import Pruner

try:  # imported here, not in every child: the CLI plots the entropies
    import matplotlib.pyplot  # noqa: F401
    import sklearn.datasets  # noqa: F401
except ImportError:
    pass

WHENS = {"call": ("before", "after"), "write": ("torn", "unrenamed", "after"), "step": ("after",)}
PHASES = {  # phase -> how it is hooked
    "dense": "step", "measure": "call", "prune": "call", "retrain": "step", "evaluate": "call",
    "checkpoint": "write", "fold": "call", "report": "write",
}
JOB_PHASES = {
    "loop": ["measure", "prune", "retrain", "evaluate", "checkpoint", "report"],
    "cli": ["dense", "measure", "prune", "retrain", "evaluate", "checkpoint", "fold", "report"],
    "experiment": ["dense", "measure", "prune", "retrain", "checkpoint", "fold", "report"],
}


# ----- the jobs (each runs in the current folder) -------------------------------------------------
def job_loop() -> None:
    torch.manual_seed(0)  # the script seeds every generator it draws from
    np.random.seed(0)
    random.seed(0)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(320, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g) + 0.7 * torch.randn(320, 4, generator=g)).argmax(1)
    train_set, val_set = torch.utils.data.TensorDataset(x[:256], y[:256]), torch.utils.data.TensorDataset(x[256:],
                                                                                                          y[256:])
    train_loader, calib = make_loader(train_set, 32, shuffle=True), make_loader(train_set, 128)
    model = torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(48, 48), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(48, 4))
    nepenthe.train(model, train_loader, nepenthe.TrainConfig(epochs=2))

    def retrain(m, iteration):
        # numpy and Python draws too, so every global generator a checkpoint keeps decides the result
        lr = 0.05 * (0.8 + 0.4 * float(np.random.rand())) * (0.8 + 0.4 * random.random())
        nepenthe.train(m, train_loader, nepenthe.TrainConfig(epochs=1, lr=lr))

    result = nepenthe.prune(model, calib, retrain=retrain,
                            evaluate=lambda m: nepenthe.evaluate(m, make_loader(val_set, 64)),
                            config=nepenthe.PruneConfig(max_iters=5, delta=1.5, max_backoffs=1, zeta=0.6,
                                                        checkpoint_dir="ckpt"),
                            rng_generators=[train_loader])
    torch.save(model.state_dict(), "model.pt")
    Path("report.json").write_text(json.dumps({"selected": result.selected, "stop_reason": result.stop_reason,
                                               "iterations": [r.to_dict() for r in result.iterations]}, indent=1))


def job_cli() -> None:
    code = cli_main(["run", "--out", "out", "--data-limit", "240", "--epochs", "2", "--retrain-epochs", "1",
                     "--batch-size", "48", "--iters", "3", "--planner", "all", "--latency-batch", "8",
                     "--threads", "1", "--no-progress"])
    if code != 0:
        raise SystemExit(f"nepenthe run exited with {code}")


EXPERIMENT = {
    "name": "resume", "seeds": [0], "methods": ["nepenthe", "imp"],
    "data": {"dataset": "digits", "limit": 160, "batch_size": 32, "calib_batch_size": 80, "calib_batches": 1},
    "model": {"name": "mlp", "options": {"width": 16, "hidden": 16, "depth": 2}},
    "dense": {"epochs": 2, "lr": 0.05}, "retrain": {"epochs": 0.5},
    "prune": {"zeta": 0.5, "delta": None, "max_iters": 2}, "fold": {"planner": "all"},
    "latency": {"batches": [1, 8], "repeats": 2, "warmup": 1, "threads": 1},
}


def job_experiment() -> None:
    run_experiment(from_dict(json.loads(json.dumps(EXPERIMENT))), "out", progress=False, echo=lambda s: None)


JOBS = {"loop": job_loop, "cli": job_cli, "experiment": job_experiment}


# ----- positions and kills (in a child) -----------------------------------------------------------
class Tracker:
    """Counts the calls of each phase per (checkpoint folder, iteration in progress) and kills the
    process at the first call of ``target``'s phase at or after its position in ``order``."""

    def __init__(self, order: list | None = None, target: dict | None = None):
        self.ctx, self.it, self.in_retrain = "start", 0, False
        self.counts: dict[str, dict[str, int]] = {}
        self.order = [tuple(k) for k in (order or [])]
        self.seen: list[tuple] = []
        self.target = target

    def key(self) -> tuple:
        return (self.ctx, self.it)

    def at(self, phase: str) -> str | None:
        """Count a call of ``phase``; the moment to die at, when this call is (past) the target."""
        key = self.key()
        if key not in self.seen:
            self.seen.append(key)
        slot = self.counts.setdefault(phase, {})
        name = json.dumps(key)
        slot[name] = slot.get(name, 0) + 1
        t = self.target
        if t is None or t["phase"] != phase:
            return None
        rank = self.order.index(key) if key in self.order else len(self.order)
        wanted = self.order.index(tuple(t["key"]))
        if rank > wanted or (rank == wanted and slot[name] >= t["j"]):
            return t["when"]
        return None


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(tr: Tracker) -> None:
    def call_hook(owner, name, phase):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            when = tr.at(phase)
            if when == "before":
                die()
            out = original(*args, **kwargs)
            if when == "after":
                die()
            return out
        setattr(owner, name, wrapper)

    latency = pipeline.compare_latency  # timings decide nothing compared: 3 repeats, not nepenthe run's 30
    pipeline.compare_latency = lambda *a, **k: latency(*a, **{**k, "repeats": min(k.get("repeats", 3), 3)})
    call_hook(Pruner, "measure", "measure")
    call_hook(Pruner, "prune_step", "prune")
    call_hook(iterate, "_evaluate", "evaluate")
    call_hook(pipeline, "fold", "fold")
    call_hook(runner, "fold", "fold")

    retrain = iterate._retrain_with_masks

    def retrain_wrapper(*args, **kwargs):
        tr.in_retrain = True
        try:
            return retrain(*args, **kwargs)
        finally:
            tr.in_retrain = False
    iterate._retrain_with_masks = retrain_wrapper

    def step_hook(opt, args, kwargs):
        if tr.at("retrain" if tr.in_retrain else "dense") == "after":
            die()
    register_optimizer_step_post_hook(step_hook)

    write = checkpoint_module._atomic_write

    def write_wrapper(path, writer):
        when = tr.at("checkpoint" if Path(path).name.startswith("iter_") else "report")
        if when in ("torn", "unrenamed"):
            def dying(f):
                buffer = io.BytesIO()
                writer(buffer)
                data = buffer.getvalue()
                f.write(data if when == "unrenamed" else data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                die()
            return write(path, dying)
        out = write(path, writer)
        if when == "after":
            die()
        return out
    checkpoint_module._atomic_write = write_wrapper

    prune = iterate.prune_
    load, save = iterate.load_checkpoints, iterate.save_checkpoint

    def prune_wrapper(*args, **kwargs):
        config = kwargs.get("config")
        tr.ctx, tr.it = str(config.checkpoint_dir), 0
        try:
            return prune(*args, **kwargs)
        finally:
            tr.ctx = f"{config.checkpoint_dir}:after"

    def load_wrapper(*args, **kwargs):
        found = load(*args, **kwargs)
        tr.it = len(found)
        return found

    def save_wrapper(directory, pruner, record, *args, **kwargs):
        out = save(directory, pruner, record, *args, **kwargs)
        tr.it = record.iteration + 1
        return out
    iterate.load_checkpoints, iterate.save_checkpoint = load_wrapper, save_wrapper
    pipeline.prune = runner.prune = nepenthe.prune = prune_wrapper


def child(job: str, folder: Path, tracker: Tracker, control: bool) -> None:
    """Run ``job`` in ``folder`` in this (forked) process and exit: 0 done, 1 failed."""
    try:
        log = os.open(folder.parent / f"{folder.name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(log, 1)  # the job's prints stay out of the driver's JSON line
        os.dup2(log, 2)
        os.chdir(folder)
        seed = int.from_bytes(os.urandom(4), "little")  # a new process's generators: anything
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        install(tracker)
        if control:  # the bug this fixes: a resume that leaves the random states as they are
            iterate.restore_random_states = lambda *a, **k: None
        JOBS[job]()
        Path("counts.json").write_text(json.dumps({"counts": tracker.counts, "order": tracker.seen}))
    except BaseException:  # noqa: BLE001 - reported through the exit status
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def run(job: str, folder: Path, tracker: Tracker, control: bool = False) -> str:
    """``"done"`` or ``"killed"`` (anything else raises)."""
    folder.mkdir(parents=True, exist_ok=True)
    pid = os.fork()
    if pid == 0:
        child(job, folder, tracker, control)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed"
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return "done"
    tail = (folder.parent / f"{folder.name}.log").read_text()[-3000:]
    raise SystemExit(f"{job} in {folder} failed (status {status}):\n{tail}")


def targets(counts: dict, order: list, phase: str, n: int, rng: random.Random) -> list[dict]:
    """``n`` kill points of ``phase`` drawn over the uninterrupted run, in run order."""
    points = [(order.index(tuple(json.loads(k))), json.loads(k), j, when) for k, c in counts.get(phase, {}).items()
              for j in range(1, c + 1) for when in WHENS[PHASES[phase]]]
    if not points:
        return []
    chosen = rng.sample(points, n) if len(points) >= n else [rng.choice(points) for _ in range(n)]
    return [{"phase": phase, "key": key, "j": j, "when": when}
            for _, key, j, when in sorted(chosen, key=lambda p: (p[0], p[2]))]


def chain(job: str, folder: Path, points: list[dict], order: list, control: bool = False) -> list[dict]:
    """Kill the job at each of ``points`` in turn (each run resumes the last), then run it to the end;
    the points it was killed at."""
    killed = []
    for target in points:
        if run(job, folder, Tracker(order, target), control) == "done":
            return killed  # the point lay in work this resume skipped: the job is done
        killed.append(target)
    run(job, folder, Tracker(), control)
    return killed


def campaign(job: str, work: Path, kills: int, mode: str, rng: random.Random) -> dict:
    """``mode``: ``phase`` (a chain of ``kills`` kills per phase), ``mixed`` (one chain, ``kills`` per
    phase, in run order) or ``control`` (the loop without restoring random states: must differ)."""
    done = {"ref": run(job, work / "ref", Tracker()), "again": run(job, work / "again", Tracker())}
    ref = json.loads((work / "ref" / "counts.json").read_text())
    order = [tuple(k) for k in ref["order"]]
    rank = {key: i for i, key in enumerate(order)}
    points = {phase: targets(ref["counts"], order, phase, kills, rng)
              for phase in (["retrain"] if mode == "control" else JOB_PHASES[job])}
    log: dict = {"runs": done, "kills": {}, "chains": {}}
    if mode == "mixed":
        everything = sorted((t for ts in points.values() for t in ts),
                            key=lambda t: (rank[tuple(t["key"])], t["phase"] != "checkpoint", t["j"]))
        killed = chain(job, work / "mixed", everything, order)
        log["chains"]["mixed"] = str(work / "mixed")
        log["kills"] = {phase: [t for t in killed if t["phase"] == phase] for phase in points}
    else:
        for phase, ts in points.items():
            folder = work / (f"control-{phase}" if mode == "control" else phase)
            log["kills"][phase] = chain(job, folder, ts, order, control=mode == "control")
            log["chains"][phase] = str(folder)
    return log


def main(argv: list[str]) -> None:
    """``WORK SEED JOB:KILLS:MODE ...``; prints one JSON object: per campaign, its runs and kills."""
    work, seed = Path(argv[0]), int(argv[1])
    torch.set_num_threads(1)
    rng = random.Random(seed)
    out = {}
    for spec in argv[2:]:
        job, kills, mode = spec.split(":")
        out[spec] = campaign(job, work / f"{job}-{mode}", int(kills), mode, rng)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
