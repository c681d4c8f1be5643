"""C++ CPU kernels of nepenthe._C against plain PyTorch, with 2 intra-op threads.

Checks the performance targets of the "cpp" backend (medians of torch.utils.benchmark.Timer):

* sign_histogram_ on a 256x64x56x56 fp32 tensor (contiguous NCHW and channels_last): >= 5x faster
  than the fastest of several plain-PyTorch expressions computing the ON/OFF/ZERO counts;
* activation_histogram_ (relu, fused count + activation) against torch.relu alone;
* masked_sgd_ (momentum 0.9, wd 5e-4, every parameter ~50% masked) over a ResNet-18 parameter set:
  <= 1.10x an UNMASKED torch.optim.SGD(foreach=True) step; masked_adamw_ vs torch.optim.AdamW(foreach=True).

Run: python bench/cpu_kernel_check.py [--quick] (after python setup.py build_ext --inplace).
Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys

import torch
from torch.utils.benchmark import Timer

from nepenthe.ops import backends, reference

backends.load("cpp")  # imports nepenthe._C (registers torch.ops.nepenthe_ext.*) or says how to build it
OPS = torch.ops.nepenthe_ext


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def median_ms(stmt: str, env: dict, min_run_time: float) -> float:
    timer = Timer(stmt=stmt, globals=env, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def compare_ms(stmts: dict[str, str], env: dict, min_run_time: float, rounds: int) -> dict[str, float]:
    """Median (over ``rounds`` interleaved rounds) of each statement's Timer median, in ms.

    Interleaving the candidates round by round keeps a burst of load from other processes on a
    small shared machine from landing on one side of a comparison only.
    """
    per_round: dict[str, list[float]] = {name: [] for name in stmts}
    for _ in range(rounds):
        for name, stmt in stmts.items():
            per_round[name].append(median_ms(stmt, env, min_run_time / rounds))
    return {name: statistics.median(times) for name, times in per_round.items()}


# ----- sign histogram ------------------------------------------------------------------------------------
TORCH_COUNTS = {
    "stack of 3 sums": "torch.stack([(x > 0).sum((0, 2, 3)), (x < 0).sum((0, 2, 3)), (x == 0).sum((0, 2, 3))])",
    "2 sums, zero = n - on - off": (
        "on = (x > 0).sum((0, 2, 3)); off = (x < 0).sum((0, 2, 3)); torch.stack([on, off, n - on - off])"),
    "count_nonzero x3": ("torch.stack([torch.count_nonzero(x > 0, (0, 2, 3)), torch.count_nonzero(x < 0, (0, 2, 3)), "
                         "torch.count_nonzero(x == 0, (0, 2, 3))])"),
    "sign(x): sum and |.|-sum": (
        "s = torch.sign(x); p = s.sum((0, 2, 3)); a = s.abs().sum((0, 2, 3)); "
        "torch.stack([(a + p) / 2, (a - p) / 2, n - a])"),
}


def bench_sign_histogram(x: torch.Tensor, label: str, min_run_time: float, rounds: int) -> float:
    """nepenthe's speed-up over the fastest plain-PyTorch expression for the ON/OFF/ZERO counts."""
    n = x.numel() // x.shape[1]
    hist = torch.zeros(x.shape[1], 4, dtype=torch.int64)
    x3 = reference.as_3d(x, 1)
    OPS.sign_histogram_(hist, x3, None)
    want = torch.stack([(x > 0).sum((0, 2, 3)), (x < 0).sum((0, 2, 3)), (x == 0).sum((0, 2, 3))], 1)
    assert torch.equal(hist[:, :3], want), "sign_histogram_ disagrees with PyTorch"
    env = {"torch": torch, "x": x, "n": n, "hist": hist, "x3": x3, "OPS": OPS}
    times = compare_ms({"nepenthe": "OPS.sign_histogram_(hist, x3, None)", **TORCH_COUNTS}, env, min_run_time, rounds)
    ours = times.pop("nepenthe")
    best = min(times, key=times.get)
    for name, ms in times.items():
        print(f"    torch [{name}]: {ms:8.2f} ms")
    print(f"  sign_histogram_ {label}: nepenthe {ours:.2f} ms, best torch ({best}) {times[best]:.2f} ms "
          f"-> {times[best] / ours:.1f}x faster")
    return times[best] / ours


def bench_activation(x: torch.Tensor, label: str, min_run_time: float, rounds: int) -> float:
    """Time of the fused relu + histogram over torch.relu alone."""
    y = torch.empty_like(x)
    hist = torch.zeros(x.shape[1], 5, dtype=torch.int64)
    x3, y3 = reference.as_3d(x, 1), reference.as_3d(y, 1)
    relu = reference.ACTIVATIONS.index("relu")
    OPS.activation_histogram_(x3, y3, hist, relu, 0.0, None)
    assert torch.equal(y, torch.relu(x)), "activation_histogram_ relu disagrees with torch.relu"
    z = x.clone()
    z3 = reference.as_3d(z, 1)
    env = {"torch": torch, "x": x, "y": y, "z": z, "x3": x3, "y3": y3, "z3": z3, "hist": hist, "OPS": OPS,
           "relu": relu}
    times = compare_ms({
        "fused": "OPS.activation_histogram_(x3, y3, hist, relu, 0.0, None)",
        "torch.relu": "torch.relu(x)",
        "clamp_min out=": "torch.clamp_min(x, 0, out=y)",
        "fused inplace": "OPS.activation_histogram_(z3, z3, hist, relu, 0.0, None)",
        "torch.relu_": "torch.relu_(z)",
    }, env, min_run_time, rounds)
    t = times
    print(f"  activation_histogram_ relu {label}: fused {t['fused']:.2f} ms vs torch.relu {t['torch.relu']:.2f} ms "
          f"-> {t['fused'] / t['torch.relu']:.2f}x (vs torch.clamp_min(out=) {t['clamp_min out=']:.2f} ms: "
          f"{t['fused'] / t['clamp_min out=']:.2f}x); inplace: fused {t['fused inplace']:.2f} ms vs torch.relu_ "
          f"{t['torch.relu_']:.2f} ms -> {t['fused inplace'] / t['torch.relu_']:.2f}x")
    return times["fused"] / times["torch.relu"]


# ----- optimizer steps -----------------------------------------------------------------------------------
def resnet18_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's resnet18 (11.69M parameters in 62 tensors)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            first = block == 0
            shapes += [(cout, cin if first else cout, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if first and (stride != 1 or cin != cout):
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
        cin = cout
    return shapes + [(1000, 512), (1000,)]


def bench_optimizers(min_run_time: float, rounds: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    shapes = resnet18_shapes()
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) * 1e-2 for s in shapes]
    masks = [torch.rand(s, generator=g) > 0.5 for s in shapes]
    print(f"  parameter set: {len(shapes)} tensors, {sum(p.numel() for p in params) / 1e6:.2f}M parameters")

    # torch.optim references (unmasked), warmed up so the state exists
    tparams = [torch.nn.Parameter(p.clone()) for p in params]
    for p, gr in zip(tparams, grads):
        p.grad = gr.clone()
    sgd = torch.optim.SGD(tparams, lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True)
    sgd.step()
    aparams = [torch.nn.Parameter(p.clone()) for p in params]
    for p, gr in zip(aparams, grads):
        p.grad = gr.clone()
    adamw = torch.optim.AdamW(aparams, lr=1e-3, weight_decay=1e-2, foreach=True)
    adamw.step()

    bufs = [torch.randn(s, generator=g) for s in shapes]
    exp_avgs = [torch.randn(s, generator=g) for s in shapes]
    exp_avg_sqs = [torch.rand(s, generator=g) for s in shapes]
    no_masks = [None] * len(shapes)
    env = {"OPS": OPS, "params": params, "grads": grads, "bufs": bufs, "masks": masks, "no_masks": no_masks,
           "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "sgd": sgd, "adamw": adamw, "tparams": tparams,
           "torch": torch}
    sgd_args = "0.01, 0.9, 0.0, 5e-4, False, False, False"
    t = compare_ms({
        "torch": "sgd.step()",
        "masked": f"OPS.masked_sgd_(params, grads, bufs, masks, {sgd_args})",
        "unmasked": f"OPS.masked_sgd_(params, grads, bufs, no_masks, {sgd_args})",
    }, env, min_run_time, rounds)
    print(f"  SGD (momentum 0.9, wd 5e-4): torch foreach unmasked {t['torch']:.2f} ms; nepenthe masked "
          f"{t['masked']:.2f} ms -> {t['masked'] / t['torch']:.2f}x torch; nepenthe unmasked {t['unmasked']:.2f} ms")
    adam_args = "1e-3, 0.9, 0.999, 1e-8, 1e-2, 10, False, False"
    a = compare_ms({
        "torch": "adamw.step()",
        "masked": f"OPS.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], masks, {adam_args})",
        "unmasked": f"OPS.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], no_masks, {adam_args})",
    }, env, min_run_time, rounds)
    print(f"  AdamW (wd 1e-2): torch foreach unmasked {a['torch']:.2f} ms; nepenthe masked {a['masked']:.2f} ms "
          f"-> {a['masked'] / a['torch']:.2f}x torch; nepenthe unmasked {a['unmasked']:.2f} ms")
    return t["masked"] / t["torch"], a["masked"] / a["torch"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing runs (noisier)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    min_run_time = 2.0 if args.quick else 10.0  # per candidate, split over the rounds
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; {torch.get_num_threads()} threads")

    ok = True
    x = torch.randn(256, 64, 56, 56, generator=torch.Generator().manual_seed(0))
    x[x.abs() < 0.05] = 0.0  # some exact zeros
    layouts = (("NCHW", x), ("channels_last", x.to(memory_format=torch.channels_last)))
    print("sign_histogram_ (256x64x56x56 fp32):")
    for label, t in layouts:
        ok &= bench_sign_histogram(t, label, min_run_time, args.rounds) >= 5.0
    print("activation_histogram_ relu (256x64x56x56 fp32):")
    for label, t in layouts:
        bench_activation(t, label, min_run_time, args.rounds)
    del x, layouts
    print("masked optimizer steps (ResNet-18 parameter set, fp32, every parameter ~50% masked):")
    sgd_ratio, _ = bench_optimizers(min_run_time, args.rounds)
    ok &= sgd_ratio <= 1.10
    print("all targets met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
