"""Peak memory of one pruning iteration against one dense training step (issue 15 item 3).

    .venv/bin/python bench/bench_memory.py [--shape deep|bert] [--batch 256] [--calib-batches 4]
                                           [--threads 1] [--json out.json]

Each phase runs in a fresh interpreter, so its peak resident set (``ru_maxrss``) is its own:

* ``idle``: the model built, nothing run (what every other phase starts from);
* ``dense``: one training step, forward + backward + ``torch.optim.AdamW`` (its state created);
* ``nepenthe`` / ``imp``: one pruning iteration by ``nepenthe.prune_step`` (trace, measure the
  rectifiers on ``--calib-batches`` batches, the method's budget, the mask update);
* ``… @50%``: the same on a model whose Linear weights already carry 50 % random masks (a later
  iteration: the masks are held and the remaining weights are selected through them);
  ``+packed``: masks stored bit-packed (``PruneConfig(pack_masks=True)``, 1/8 byte a weight), the table
  giving the largest total of unpacked (bool) masks that existed at once during the step;
* ``snapshot@50%``: what the loop keeps of such a model between iterations (``Pruner.snapshot``,
  after the masked weights were zeroed as retraining under the loop leaves them): ``state_bytes``
  = the whole state_dict (what a ``copy.deepcopy(model.state_dict())`` snapshot held),
  ``snapshot_bytes`` = what the snapshot holds now (kept weights, masks as stored);
* ``resume@50%``: a rerun of ``nepenthe.prune`` on a freshly built model (no masks) that resumes from
  the ``--resume-iters`` + 1 checkpoints a run of the loop on the ``@50%`` model wrote (written
  beforehand by another process, ``--resume-dir``): it reads every checkpoint, keeps what a resume
  needs, restores the model and returns; ``checkpoint_bytes`` = the files read.

Each phase runs ``--repeats`` times (rounds over all phases); the table gives the median peak and
the largest. The ratio is the median peak over the dense step's (target ≤ 1.1), with the worst
case (largest peak over the smallest dense peak) beside it; "over model" is the peak minus the
resident set right after the model was built (the phase's own working memory); "phase's own peak" is
the resident high-water mark from the moment the model (and its starting masks) was built, reset
then (Linux ``/proc/self/clear_refs``): the set-up's own peak left out (the median over the repeats).
The set-up's free heap pages are given back (glibc ``malloc_trim``) before the phase starts.
Models (float32, no downloads): ``deep`` = 128 pre-norm residual blocks 512 → 768 → 512, ReLU after
fc1 and GELU after fc2 (256 rectifier layers, 101.0M parameters); ``bert`` = 20 BERT-base MLP
blocks 768 → 3072 → 768 (40 rectifier layers, 94.5M parameters).

The script is also collected by pytest (``bench_*.py``): the test at the end runs every phase on
a tiny model, in-process, as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn as nn

SHAPES = {"deep": dict(blocks=128, width=512, hidden=768), "bert": dict(blocks=20, width=768, hidden=3072),
          "tiny": dict(blocks=3, width=16, hidden=24)}
PHASES = ("idle", "dense", "nepenthe", "imp", "nepenthe@50%", "imp@50%", "nepenthe@50%+packed", "imp@50%+packed",
          "snapshot@50%", "snapshot@50%+packed", "resume@50%", "resume@50%+packed")
RESUME_ITERS = 3  # iterations the resumed run finds done (+ the dense iteration 0: 4 checkpoints)


class Block(nn.Module):
    """x + GELU(fc2(ReLU(fc1(LayerNorm(x))))): two rectifier layers, each fed by its own Linear."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm, self.fc1, self.act1 = nn.LayerNorm(width), nn.Linear(width, hidden), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(hidden, width), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act2(self.fc2(self.act1(self.fc1(self.norm(x)))))


class MLPStack(nn.Module):
    def __init__(self, blocks: int, width: int, hidden: int, classes: int = 10):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(width, hidden) for _ in range(blocks)])
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``): the set-up's temporaries
    (a random float mask per layer, between the long-lived masks) otherwise leave holes that keep
    the resident set 0–350 MiB higher from one run to the next, whatever the phase then does."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _reset_peak() -> bool:
    """Reset the process's resident high-water mark (Linux: ``5`` into /proc/self/clear_refs), so that
    VmHWM afterwards is the phase's own peak, not the set-up's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_kib() -> int | None:
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), None)


def _track_unpacked() -> list[int]:
    """Count the elements (= bytes) of the unpacked masks (``nepenthe.masks.unpack_mask``'s results) alive
    at once, wherever the function was imported to; returns [peak], updated as the phase runs."""
    import weakref

    import nepenthe.masks as masks

    original, alive, peak = masks.unpack_mask, [], [0]

    def tracked(packed, shape):
        out = original(packed, shape)
        alive[:] = [(r, n) for r, n in alive if r() is not None] + [(weakref.ref(out), out.numel())]
        peak[0] = max(peak[0], sum(n for _, n in alive))
        return out

    for name, module in list(sys.modules.items()):
        if name.startswith("nepenthe") and getattr(module, "unpack_mask", None) is original:
            module.unpack_mask = tracked
    return peak


def _resume_run(model: nn.Module, calib: list, folder: str, packed: bool, calib_batches: int):
    """The loop with checkpoints in ``folder``, no retraining and a constant accuracy (what it keeps and
    reads is what the bench is about): writes them, or, run again, resumes from them."""
    import nepenthe

    config = nepenthe.PruneConfig(max_iters=RESUME_ITERS, delta=None, max_calib_batches=calib_batches,
                                  pack_masks=packed, checkpoint_dir=folder, metric_scale=1.0)
    return nepenthe.prune(model, calib, retrain=lambda m, it: None, evaluate=lambda m: 90.0, config=config)


def _resume_folder(base: str, shape: str, packed: bool) -> str:
    return os.path.join(base, f"{shape}{'-packed' if packed else ''}")


def prepare_resume(shape: str, base: str, batch: int = 256, calib_batches: int = 4) -> None:
    """Write the checkpoints the ``resume`` phases read (both mask storages), unless they are there."""
    for packed in (False, True):
        folder = _resume_folder(base, shape, packed)
        if not os.path.exists(os.path.join(folder, f"iter_{RESUME_ITERS:03d}.pt")):
            model, calib = _built(shape, masked=True, packed=packed, batch=batch, calib_batches=calib_batches)
            _resume_run(model, calib, folder, packed, calib_batches)


def _built(shape: str, masked: bool, packed: bool, batch: int, calib_batches: int) -> tuple[nn.Module, list]:
    """The model (every Linear half masked when ``masked``) and its calibration batches."""
    from nepenthe.masks import set_mask

    torch.manual_seed(0)
    model = MLPStack(**SHAPES[shape])
    if masked:  # a later iteration: every Linear already half masked
        gen = torch.Generator().manual_seed(1)
        for m in model.modules():
            if isinstance(m, nn.Linear):
                set_mask(m, torch.rand(m.weight.shape, generator=gen) < 0.5, packed=packed)
    width = SHAPES[shape]["width"]
    calib = [(torch.randn(batch, width), torch.zeros(batch, dtype=torch.long)) for _ in range(calib_batches)]
    return model, calib


def _sparsity(model: nn.Module) -> float:
    from nepenthe.masks import sparsity

    return round(sparsity({n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)})[0], 4)


def run_phase(phase: str, shape: str = "deep", batch: int = 256, calib_batches: int = 4,
              resume_dir: str | None = None) -> dict:
    """Build the model, run ``phase`` once; peak and resident memory in KiB (meaningful only in a
    fresh process) and what the phase did. ``resume_dir``: where :func:`prepare_resume` wrote."""
    import nepenthe

    rest, _, packed = phase.partition("+")
    method, _, masked = rest.partition("@")
    # a resumed run starts from a model as built: the checkpoints hold its masks
    model, calib = _built(shape, bool(masked) and method != "resume", bool(packed), batch, calib_batches)
    width = SHAPES[shape]["width"]
    _trim_heap()
    built = _rss_kib()
    reset = _reset_peak()
    started = time.perf_counter()
    info: dict = {}
    if method == "dense":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x, y = torch.randn(batch, width), torch.randint(10, (batch,))
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    elif method in ("nepenthe", "imp"):
        config = nepenthe.PruneConfig(method=method, max_calib_batches=calib_batches, pack_masks=bool(packed))
        unpacked = _track_unpacked()
        step = nepenthe.prune_step(model, calib, config=config)
        info = {"pruned": sum(step.pruned.values()), "layers": len(step.pruned), "unpacked_peak_bytes": unpacked[0],
                "sparsity": _sparsity(model)}
    elif method == "snapshot":
        from nepenthe.loop import enforce_masks
        from nepenthe.loop.snapshot import compact_state, state_bytes

        enforce_masks(model)  # masked weights +0.0, as after a retraining under the loop
        snap = compact_state(model.state_dict(), [])  # = Pruner.snapshot() of a model without FSDP2
        info = {"state_bytes": state_bytes(model.state_dict()), "snapshot_bytes": snap.nbytes}
    elif method == "resume":
        folder = _resume_folder(resume_dir, shape, bool(packed))
        result = _resume_run(model, calib, folder, bool(packed), calib_batches)
        files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".pt")]
        info = {"resumed": len(result.iterations), "checkpoint_bytes": sum(os.path.getsize(f) for f in files),
                "files": len(files), "sparsity": _sparsity(model)}
    elif method != "idle":
        raise ValueError(f"unknown phase {phase!r}; one of {PHASES}")
    return {"phase": phase, "shape": shape, "peak_kib": _peak_kib(), "built_kib": built,
            "phase_peak_kib": _hwm_kib() if reset else None,
            "seconds": round(time.perf_counter() - started, 2),
            "params": sum(p.numel() for p in model.parameters()), "nepenthe": os.path.dirname(nepenthe.__file__),
            **info}


def run_isolated(phase: str, shape: str, batch: int, calib_batches: int, threads: int, resume_dir: str) -> dict:
    """``run_phase`` in a fresh interpreter (its own peak resident set)."""
    code = ("import json, sys, torch; sys.path.insert(0, sys.argv[1]); torch.set_num_threads(int(sys.argv[6])); "
            "import bench_memory as b; print(json.dumps(b.run_phase(sys.argv[2], sys.argv[3], int(sys.argv[4]), "
            "int(sys.argv[5]), sys.argv[7])))")
    here = os.path.dirname(os.path.abspath(__file__))
    # -P: no working directory on sys.path, so PYTHONPATH decides which nepenthe is measured
    argv = [here, phase, shape, str(batch), str(calib_batches), str(threads), resume_dir]
    out = subprocess.run([sys.executable, "-P", "-c", code, *argv], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    """One line per phase: the median over its repeats, and the worst repeat (the largest peak
    against the smallest dense peak)."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["phase"], []).append(r)
    peaks = {p: sorted(r["peak_kib"] for r in rs) for p, rs in by.items()}
    median = {p: v[len(v) // 2] for p, v in peaks.items()}
    dense = peaks.get("dense")
    lines = ["| phase | peak RSS MiB (max) | over model MiB | phase's own peak MiB | peak / dense step (worst) "
             "| seconds | pruned |", "|---|---|---|---|---|---|---|"]
    for phase, rs in by.items():
        r = next(r for r in rs if r["peak_kib"] == median[phase])
        ratio = f"{median[phase] / median['dense']:.2f}× ({peaks[phase][-1] / dense[0]:.2f}×)" if dense else "-"
        unpacked = r.get("unpacked_peak_bytes")
        pruned = (f"{r['pruned']:,} ({r['sparsity']:.1%})" + (f"; unpacked masks ≤ {unpacked / 2**20:.1f} MiB"
                                                              if unpacked else "") if "pruned" in r else
                  f"snapshot {r['snapshot_bytes'] / 2**20:.0f} MiB of a {r['state_bytes'] / 2**20:.0f} MiB state"
                  if "snapshot_bytes" in r else
                  f"{r['files']} checkpoints, {r['checkpoint_bytes'] / 2**20:.0f} MiB; sparsity {r['sparsity']:.1%}"
                  if "checkpoint_bytes" in r else "-")
        own = sorted(x["phase_peak_kib"] for x in rs if x.get("phase_peak_kib"))
        own_text = f"{own[len(own) // 2] / 1024:.0f}" if own else "-"
        lines.append(f"| {phase} | {median[phase] / 1024:.0f} ({peaks[phase][-1] / 1024:.0f}) | "
                     f"{(median[phase] - r['built_kib']) / 1024:.0f} | {own_text} | {ratio} | {r['seconds']} | "
                     f"{pruned} |")
    return "\n".join(lines)


def environment() -> str:
    import nepenthe

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
            f"Python {platform.python_version()}, torch {torch.__version__}, "
            f"nepenthe {nepenthe.__version__} from {os.path.dirname(nepenthe.__file__)}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="deep")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per phase (median reported)")
    parser.add_argument("--resume-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "nepenthe-bench-resume"),
                        help="where the resume phases' checkpoints are written once (reused when there)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if any(p.startswith("resume") for p in args.phases.split(",")):  # written by another process: not measured
        subprocess.run([sys.executable, "-P", "-c", "import sys; sys.path.insert(0, sys.argv[1]); import bench_memory "
                        "as b; b.prepare_resume(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))",
                        os.path.dirname(os.path.abspath(__file__)), args.shape, args.resume_dir, str(args.batch),
                        str(args.calib_batches)], check=True)
    rows = []
    for _ in range(args.repeats):  # rounds over the phases, so a slow drift of the machine hits them all
        for phase in args.phases.split(","):
            rows.append(run_isolated(phase, args.shape, args.batch, args.calib_batches, args.threads, args.resume_dir))
            print(f"  {phase}: peak {rows[-1]['peak_kib'] / 1024:.0f} MiB", file=sys.stderr, flush=True)
    print(f"{args.shape}: {rows[0]['params'] / 1e6:.1f}M parameters; {environment()}")
    if len({r["nepenthe"] for r in rows} | {os.path.dirname(sys.modules["nepenthe"].__file__)}) > 1:
        raise RuntimeError(f"phases ran different nepenthe packages: {sorted({r['nepenthe'] for r in rows})}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "args": vars(args), "rows": rows}, f, indent=1)
    return rows


def test_memory_bench_phases_on_a_tiny_model(tmp_path):
    prepare_resume("tiny", str(tmp_path), batch=8, calib_batches=2)
    rows = [run_phase(phase, "tiny", batch=8, calib_batches=2, resume_dir=str(tmp_path)) for phase in PHASES]
    by = {r["phase"]: r for r in rows}
    assert by["idle"]["params"] == by["dense"]["params"] == 3 * (16 * 24 * 2 + 24 + 16 + 32) + 16 * 10 + 10
    for phase in ("nepenthe", "imp"):
        assert by[phase]["pruned"] > 0 and 0 < by[phase]["sparsity"] < 1
        assert by[phase + "@50%"]["sparsity"] > by[phase]["sparsity"]  # the masks it started from are kept
    for phase in ("nepenthe", "imp"):  # the storage changes nothing selected
        assert by[phase + "@50%+packed"]["pruned"] == by[phase + "@50%"]["pruned"]
    largest = max(m.weight.numel() for m in MLPStack(**SHAPES["tiny"]).modules() if isinstance(m, nn.Linear))
    assert all(0 < by[p + "@50%+packed"]["unpacked_peak_bytes"] <= largest for p in ("nepenthe", "imp"))
    bools, packed = by["snapshot@50%"], by["snapshot@50%+packed"]
    assert bools["state_bytes"] > bools["snapshot_bytes"] > packed["snapshot_bytes"]
    for phase in ("resume@50%", "resume@50%+packed"):  # every iteration found done, the masks restored
        assert by[phase]["resumed"] == RESUME_ITERS + 1 and by[phase]["files"] == RESUME_ITERS + 1
        assert by[phase]["sparsity"] > by["nepenthe@50%"]["sparsity"]
    assert by["resume@50%"]["checkpoint_bytes"] > by["resume@50%+packed"]["checkpoint_bytes"]
    text = table(rows)
    assert text.count("\n") == len(PHASES) + 1 and "| dense |" in text and "| 1.00× (1.00×) |" in text
    twice = table(rows + [{**by["dense"], "peak_kib": by["dense"]["peak_kib"] * 2}])  # median of 2: the larger
    assert twice.count("\n") == len(PHASES) + 1 and "| 1.00× (2.00×) |" in twice


if __name__ == "__main__":
    main()
