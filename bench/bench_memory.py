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
  ``+packed``: masks stored bit-packed (``PruneConfig(pack_masks=True)``, 1/8 byte a weight).

Each phase runs ``--repeats`` times (rounds over all phases); the table gives the median peak and
the largest. The ratio is the median peak over the dense step's (target ≤ 1.1), with the worst
case (largest peak over the smallest dense peak) beside it; "over model" is the peak minus the
resident set right after the model was built (the phase's own working memory).
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
PHASES = ("idle", "dense", "nepenthe", "imp", "nepenthe@50%", "imp@50%", "imp@50%+packed")


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


def run_phase(phase: str, shape: str = "deep", batch: int = 256, calib_batches: int = 4) -> dict:
    """Build the model, run ``phase`` once; peak and resident memory in KiB (meaningful only in a
    fresh process) and what the phase did."""
    import nepenthe
    from nepenthe.masks import set_mask, sparsity

    torch.manual_seed(0)
    model = MLPStack(**SHAPES[shape])
    width = SHAPES[shape]["width"]
    rest, _, packed = phase.partition("+")
    method, _, masked = rest.partition("@")
    if masked:  # a later iteration: every Linear already half masked
        gen = torch.Generator().manual_seed(1)
        for m in model.modules():
            if isinstance(m, nn.Linear):
                set_mask(m, torch.rand(m.weight.shape, generator=gen) < 0.5, packed=bool(packed))
    built = _rss_kib()
    started = time.perf_counter()
    info: dict = {}
    if method == "dense":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x, y = torch.randn(batch, width), torch.randint(10, (batch,))
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    elif method in ("nepenthe", "imp"):
        calib = [(torch.randn(batch, width), torch.zeros(batch, dtype=torch.long)) for _ in range(calib_batches)]
        config = nepenthe.PruneConfig(method=method, max_calib_batches=calib_batches, pack_masks=bool(packed))
        step = nepenthe.prune_step(model, calib, config=config)
        info = {"pruned": sum(step.pruned.values()), "layers": len(step.pruned)}
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        info["sparsity"] = round(sparsity(linears)[0], 4)
    elif method != "idle":
        raise ValueError(f"unknown phase {phase!r}; one of {PHASES}")
    return {"phase": phase, "shape": shape, "peak_kib": _peak_kib(), "built_kib": built,
            "seconds": round(time.perf_counter() - started, 2),
            "params": sum(p.numel() for p in model.parameters()), "nepenthe": os.path.dirname(nepenthe.__file__),
            **info}


def run_isolated(phase: str, shape: str, batch: int, calib_batches: int, threads: int) -> dict:
    """``run_phase`` in a fresh interpreter (its own peak resident set)."""
    code = ("import json, sys, torch; sys.path.insert(0, sys.argv[1]); torch.set_num_threads(int(sys.argv[6])); "
            "import bench_memory as b; "
            "print(json.dumps(b.run_phase(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))")
    here = os.path.dirname(os.path.abspath(__file__))
    # -P: no working directory on sys.path, so PYTHONPATH decides which nepenthe is measured
    argv = [here, phase, shape, str(batch), str(calib_batches), str(threads)]
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
    lines = ["| phase | peak RSS MiB (max) | over model MiB | peak / dense step (worst) | seconds | pruned |",
             "|---|---|---|---|---|---|"]
    for phase, rs in by.items():
        r = next(r for r in rs if r["peak_kib"] == median[phase])
        ratio = f"{median[phase] / median['dense']:.2f}× ({peaks[phase][-1] / dense[0]:.2f}×)" if dense else "-"
        pruned = f"{r['pruned']:,} ({r['sparsity']:.1%})" if "pruned" in r else "-"
        lines.append(f"| {phase} | {median[phase] / 1024:.0f} ({peaks[phase][-1] / 1024:.0f}) | "
                     f"{(median[phase] - r['built_kib']) / 1024:.0f} | {ratio} | {r['seconds']} | {pruned} |")
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
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = []
    for _ in range(args.repeats):  # rounds over the phases, so a slow drift of the machine hits them all
        for phase in args.phases.split(","):
            rows.append(run_isolated(phase, args.shape, args.batch, args.calib_batches, args.threads))
            print(f"  {phase}: peak {rows[-1]['peak_kib'] / 1024:.0f} MiB", file=sys.stderr, flush=True)
    print(f"{args.shape}: {rows[0]['params'] / 1e6:.1f}M parameters; {environment()}")
    if len({r["nepenthe"] for r in rows} | {os.path.dirname(sys.modules["nepenthe"].__file__)}) > 1:
        raise RuntimeError(f"phases ran different nepenthe packages: {sorted({r['nepenthe'] for r in rows})}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "args": vars(args), "rows": rows}, f, indent=1)
    return rows


def test_memory_bench_phases_on_a_tiny_model():
    rows = [run_phase(phase, "tiny", batch=8, calib_batches=2) for phase in PHASES]
    by = {r["phase"]: r for r in rows}
    assert by["idle"]["params"] == by["dense"]["params"] == 3 * (16 * 24 * 2 + 24 + 16 + 32) + 16 * 10 + 10
    for phase in ("nepenthe", "imp"):
        assert by[phase]["pruned"] > 0 and 0 < by[phase]["sparsity"] < 1
        assert by[phase + "@50%"]["sparsity"] > by[phase]["sparsity"]  # the masks it started from are kept
    assert by["imp@50%+packed"]["pruned"] == by["imp@50%"]["pruned"]  # the storage changes nothing selected
    text = table(rows)
    assert text.count("\n") == len(PHASES) + 1 and "| dense |" in text and "| 1.00× (1.00×) |" in text
    twice = table(rows + [{**by["dense"], "peak_kib": by["dense"]["peak_kib"] * 2}])  # median of 2: the larger
    assert twice.count("\n") == len(PHASES) + 1 and "| 1.00× (2.00×) |" in twice


if __name__ == "__main__":
    main()
