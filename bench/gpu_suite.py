#!/usr/bin/env python3
"""The GPU check of issue 11 in one call: build, parity + race tests, bandwidth-relative benchmarks, targets.

Usage (``bench/gpu_suite.sh`` is the thin wrapper; run it from anywhere, it cds to the repository):

    bash bench/gpu_suite.sh OUT_DIR                    # on the lent GPU machine (python3 = its torch)
    bash bench/gpu_suite.sh OUT_DIR --dry-run          # here, without a GPU: every step, tiny CPU sizes
    bash bench/gpu_suite.sh OUT_DIR --only kernels,optim --budget 300   # a rerun of some steps

On the device: ``bash bench/gpu_suite.sh $OUT`` with the device tool's ``timeout_s`` at 540 or more (the suite
stops itself after ``--budget`` seconds, default 470, and prints the table last; ~10 s of slack is kept for
the report). Nothing compiled travels: the suite builds ``nepenthe._C`` from the working tree there.

Steps, in order (each a subprocess with its own timeout, each capped by what is left of the budget; a step
that fails or times out is recorded and the suite goes on; the final table is always written):

==========  =======  ==================================================================================
step        budget   what
==========  =======  ==================================================================================
env         30 s     GPU name, driver, torch / triton / CUDA / nvcc versions, date, which pytest plugins
build       240 s    ``TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace`` in the
                     background (dry run: ``scripts/check_gpu_build.sh``, nvcc sm_90 of every .cu); on
                     failure the compiler's first ``error:`` line goes into the table and build.log
tests       150 s    the Triton parity tests (``TEST_SELECTIONS['triton']``), while the build runs
                     (pytest, ``-n`` with pytest-xdist, ``--timeout`` with pytest-timeout); dry run:
                     ``pytest --collect-only`` of every selection (must collect > 0 tests)
tests_cuda  90 s     the CUDA C++ parity tests (``TEST_SELECTIONS['cuda']``), after the build
parity      60 s     built-in parity (every GPU backend vs the reference, fp32/fp16/bf16, odd /
                     channels_last / sliced / token shapes; the fallback when pytest is missing) and
                     the race check: the same call repeated on a large tensor gives identical counts
kernels     90 s     D2D copy bandwidth (>= 1 GiB, CUDA events), sign_histogram fp32/bf16, fused
                     activation+histogram relu/gelu/silu, each provider of bench/kernel_cases.py
optim       80 s     masked SGD / AdamW steps on the ResNet-18 parameters, fp32 / bf16, vs torch
                     foreach, torch fused (fused=True) and torch.compile of the plain step
measure     45 s     ``nepenthe.measure`` of the CIFAR ResNet-18 at batch 256 vs the plain forwards
fold        rest     ``nepenthe.benchmark.run_suite``: the paper's models before / after folding at batch
                     1 and 256, eager for every scenario first, then torch.compile while time lasts
==========  =======  ==================================================================================

Every nepenthe provider is timed once per GPU backend (``nepenthe[cuda]``, ``nepenthe[triton]``); timings
are ``nepenthe.latency.compare_calls`` (interleaved blocks, CUDA events on the GPU). Bytes are the fewest
the op must move (inputs read once, outputs written once, masks 1 byte); % of copy bandwidth = (bytes /
time) / (2 x copied bytes / copy time).

Targets (issue 11), each marked met / NOT met per backend: sign_histogram >= 85 % of copy bandwidth
(fp32, bf16); fused activation+histogram <= 1.10 x the plain activation; masked SGD / AdamW steps >= 80 %
of copy bandwidth and <= 1.10 x torch's fused unmasked step; measure <= 1.05 x the plain forward; folded
models never slower (after / before <= 1.02, the 2 % being timing noise).

Output (OUT_DIR, 6 files): ``summary.md`` (the table, also printed last), ``results.csv`` (one row per
timing), ``results.json`` (environment, steps, tests, rows, targets), ``build.log`` (first error + tail),
``tests.txt`` (pytest summaries and failures), ``steps.log`` (each step's output tail).

The exit status is 0 whenever the report was written (read the table: failed steps, tests and unmet
targets are marked there), 2 for bad arguments.

``--dry-run`` (= ``--device cpu --tiny``) runs every step with CPU tensors and writes the same files:
the build step is ``scripts/check_gpu_build.sh`` (joined last, so that nvcc runs beside the other steps),
the test steps ``pytest --collect-only`` of the same selections, the benchmark sections the same code on
tiny sizes (ResNet-18 at width 8, the ``mlp_block`` fold scenario with planner ``all``, torch.compile
with the ``eager`` backend on the first case of each kind, 2 ms timing blocks, one CPU thread);
tests/ops/test_gpu_suite.py runs it in the default suite and checks the files. ``--device cpu --tiny`` without
``--dry-run`` runs the GPU-mode steps on the CPU (the build is then the real ``setup.py build_ext``).
A rerun on a fresh machine that needs the CUDA C++ backend must include ``build`` in ``--only``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# pytest selections of the GPU run (the dry run collects exactly these)
TEST_SELECTIONS = {
    "triton": (["tests/ops/test_backends.py", "tests/ops/test_triton_aot.py"], "triton and not compiles_for_sm90"),
    "cuda": (["tests/ops/test_backends.py"], "cuda"),
}
STEP_BUDGETS = {"env": 30, "build": 240, "tests": 150, "tests_cuda": 90, "parity": 60, "kernels": 90, "optim": 80,
                "measure": 45, "fold": 180}
BENCH_SECTIONS = ("parity", "kernels", "optim", "measure", "fold")
ALL_STEPS = ("env", "build", "tests", "tests_cuda") + BENCH_SECTIONS
REPORT_RESERVE_S = 10.0
OUT_FILES = ("summary.md", "results.csv", "results.json", "build.log", "tests.txt", "steps.log")

HIST_TARGET_PCT = 85.0
ACT_TARGET_RATIO = 1.10
OPT_TARGET_PCT = 80.0
OPT_TARGET_RATIO = 1.10
MEASURE_TARGET_RATIO = 1.05
FOLD_TARGET_RATIO = 1.02


# =============================================================================================================
# sections (run in child processes: python bench/gpu_suite.py --section NAME --work DIR ...)
# =============================================================================================================
class Recorder:
    """A section's result file, rewritten after every row so that a killed section keeps what it measured."""

    def __init__(self, path: Path, section: str, budget: float):
        self.path, self.start, self.budget = path, time.monotonic(), budget
        self.data = {"section": section, "rows": [], "notes": [], "done": False}
        self.flush()

    def time_left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def add(self, **row) -> None:
        self.data["rows"].append(row)
        self.flush()

    def note(self, text: str) -> None:
        print(text, flush=True)
        self.data["notes"].append(text)
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def _error_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _section_env(args, rec: Recorder) -> None:
    import platform

    import torch

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "device": args.device,
           "cuda_available": torch.cuda.is_available(), "platform": platform.platform()}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        env["triton"] = f"unavailable ({_error_line(exc)})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,driver_version,clocks.sm,clocks.mem", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=15).stdout.strip().splitlines()
            if out:
                parts = [p.strip() for p in out[0].split(",")]
                env["nvidia_smi"] = out[0]
                env["driver"] = parts[1] if len(parts) > 1 else None
        except (OSError, subprocess.SubprocessError) as exc:
            env["driver"] = f"nvidia-smi failed ({exc})"
    nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
    if nvcc:
        try:
            env["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                                         timeout=15).stdout.strip().splitlines()[-1]
        except (OSError, subprocess.SubprocessError, IndexError):
            env["nvcc"] = "nvcc --version failed"
    for mod in ("pytest", "xdist", "pytest_timeout", "hypothesis", "numpy"):
        try:
            m = __import__(mod)
            env[f"have_{mod}"] = getattr(m, "__version__", "yes")
        except Exception:  # noqa: BLE001
            env[f"have_{mod}"] = None
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    rec.data["env"] = env
    rec.flush()


def _backends_for(device: str) -> list[str]:
    """The nepenthe backends to time / check on this device (each that loads); ``auto`` when none does."""
    from nepenthe.ops import backends

    names = ("cuda", "triton") if device == "cuda" else ("cpp",)
    ok = []
    for name in names:
        try:
            backends.load(name)
            ok.append(name)
        except backends.BackendUnavailable as exc:
            print(f"backend {name}: unavailable: {exc}", flush=True)
    return ok or ["torch"]


def _on_backend(name: str, fn):
    from nepenthe.ops import backends

    def call():
        with backends.use_backend(name):
            return fn()
    return call


def _per_backend(providers: dict, names: list[str], key: str = "nepenthe") -> dict:
    """``providers`` with ``key`` replaced by one ``key[backend]`` provider per backend, in front."""
    if key not in providers:
        return providers
    fn = providers[key]
    out = {f"{key}[{n}]": _on_backend(n, fn) for n in names}
    out.update({k: v for k, v in providers.items() if k != key})
    return out


def _sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def _section_parity(args, rec: Recorder) -> None:
    """Built-in parity vs the reference (pytest's fallback, always run: cheap) and the race check."""
    import torch

    from nepenthe import ops
    from nepenthe.ops import backends, reference

    dev = args.device
    names = [n for n in _backends_for(dev)]
    rec.data["backends"] = names
    g = torch.Generator().manual_seed(0)

    def signed(shape, dtype, upper=6.0):
        x = torch.randn(shape, generator=g) * 4
        x[torch.rand(shape, generator=g) < 0.15] = 0.0
        x[torch.rand(shape, generator=g) < 0.05] = upper
        return x.to(dtype=dtype, device=dev)

    n, c, h, w = (2, 3, 5, 7) if args.tiny else (5, 37, 19, 13)
    layouts = {
        "odd_nchw": (lambda d: signed((n, c, h, w), d), 1),
        "channels_last": (lambda d: signed((n, c, h, w), d).to(memory_format=torch.channels_last), 1),
        "sliced": (lambda d: signed((n, 2 * c, h, w), d)[:, ::2, 1:, :-1], 1),
        "tokens": (lambda d: signed((n, 7, c), d), -1),
    }
    tol = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    kinds = ["relu", "gelu", "silu", "relu6"]
    checks = failures = 0

    def check(name, what, fn):
        nonlocal checks, failures
        checks += 1
        try:
            fn()
            _sync(dev)
        except Exception as exc:  # noqa: BLE001 - every failure is a row, the checks go on
            failures += 1
            rec.add(kind="parity", backend=name, check=what, ok=False, error=_error_line(exc))

    for name in names:
        if rec.time_left() < 5:
            rec.note(f"parity: out of budget before backend {name}")
            break
        for dtype in dtypes:
            for lid, (make, dim) in layouts.items():
                x = make(dtype)

                def hist_ok(x=x, dim=dim, name=name):
                    with backends.use_backend(name):
                        got = ops.sign_histogram(x, dim, upper=6.0, bins=5)
                    want = reference.sign_histogram(x.cpu(), dim, 6.0, 5)
                    assert torch.equal(got.cpu(), want), "counts differ from the reference"
                check(name, f"sign_histogram {lid} {dtype}", hist_ok)
                for kind in kinds:
                    def act_ok(x=x, dim=dim, kind=kind, name=name, dtype=dtype):
                        with backends.use_backend(name):
                            y, hist = ops.activation_histogram(x, kind, dim)
                        want_h = reference.sign_histogram(x.cpu(), dim, reference.upper_kink(kind), 4)
                        assert torch.equal(hist.cpu(), want_h), "counts differ from the reference"
                        rtol, atol = tol[dtype]
                        want_y = reference.activation(x.cpu().float(), kind).to(dtype)
                        torch.testing.assert_close(y.cpu(), want_y, rtol=rtol * 4, atol=atol * 4)
                    check(name, f"activation_histogram {kind} {lid} {dtype}", act_ok)

            def optim_ok(name=name, dtype=dtype):
                shapes = [(7, 5), (3, 4, 3, 3), (1031,), (1,)]
                p = [torch.randn(s, generator=g).to(dtype=dtype, device=dev) for s in shapes]
                gr = [torch.randn(s, generator=g).to(dtype=dtype, device=dev) for s in shapes]
                st = [torch.randn(s, generator=g).abs().to(dtype=dtype, device=dev) for s in shapes]
                m = [(torch.rand(s, generator=g) > 0.4).to(dev) for s in shapes[:-1]] + [None]
                rtol, atol = tol[dtype]
                bits = [None if k is None else ops.pack_mask(k) for k in m]  # read as bits by the kernels
                for op in ("sgd", "adamw"):
                    mine = [[t.clone() for t in ts] for ts in (p, st, st)]
                    ref = [[t.clone() for t in ts] for ts in (p, st, st)]
                    packed = [[t.clone() for t in ts] for ts in (p, st, st)]
                    for which, lists, masks in ((name, mine, m), ("torch", ref, m), (name, packed, bits)):
                        with backends.use_backend(which):
                            if op == "sgd":
                                ops.masked_sgd_(lists[0], gr, lists[1], masks, lr=0.1, momentum=0.9,
                                                weight_decay=1e-3)
                            else:
                                ops.masked_adamw_(lists[0], gr, lists[1], lists[2], [], masks, lr=1e-2, step=3)
                    for a, b in zip(sum(mine, []), sum(ref, [])):
                        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=rtol, atol=atol)
                    for a, b in zip(sum(mine, []), sum(packed, [])):  # packed masks: the same step, bit for bit
                        assert torch.equal(a.cpu(), b.cpu()), f"{op}: packed masks differ from bool masks"
                    for t, mk in zip(mine[0], m):
                        if mk is not None:
                            assert bool((t.cpu()[~mk.cpu()] == 0).all()), f"{op}: masked entries not zero"
            check(name, f"masked_sgd_/masked_adamw_ {dtype}", optim_ok)
    rec.data["parity"] = {"checks": checks, "failed": failures}
    rec.note(f"parity: {checks - failures}/{checks} checks passed on {names}")

    # race check: the same call on a large tensor, repeated, gives identical counts (and the reference's)
    shape = (2, 8, 9, 9) if args.tiny else (64, 256, 56, 56)
    repeats = 3 if args.tiny else 20
    for name in names:
        for dtype, cl in ((torch.float32, False), (torch.bfloat16, True)):
            if rec.time_left() < 5:
                rec.note("race: out of budget")
                break
            try:
                x = signed(shape, dtype)
                if cl:
                    x = x.to(memory_format=torch.channels_last)
                want = reference.sign_histogram(x, 1, 6.0, 5).cpu()
                want_act = reference.sign_histogram(x, 1, None, 4).cpu()
                bad_h = bad_a = 0
                with backends.use_backend(name):
                    for _ in range(repeats):
                        bad_h += not torch.equal(ops.sign_histogram(x, 1, upper=6.0, bins=5).cpu(), want)
                        bad_a += not torch.equal(ops.activation_histogram(x, "relu", 1)[1].cpu(), want_act)
                rec.add(kind="race", backend=name, check=f"{tuple(shape)} {dtype}{' channels_last' if cl else ''}",
                        repeats=repeats, ok=bad_h == 0 and bad_a == 0, mismatched_hist=bad_h, mismatched_act=bad_a)
            except Exception as exc:  # noqa: BLE001
                rec.add(kind="race", backend=name, check=f"{tuple(shape)} {dtype}", ok=False, error=_error_line(exc))
    races = [r for r in rec.data["rows"] if r["kind"] == "race"]
    rec.note(f"race: {sum(r['ok'] for r in races)}/{len(races)} checks identical over repeats")


def _time_providers(rec: Recorder, args, section: str, case: str, providers: dict, nbytes: int | None, **extra):
    from nepenthe.benchmark import compare_providers  # the package's harness: one row schema everywhere

    rows = compare_providers(case, providers, suite="gpu_suite", repeats=args.repeats, warmup=args.warmup,
                             device=args.device, threads=args.threads, nbytes=nbytes, section=section, **extra)
    if rows[0]["error"]:  # the timing failed (one row): recorded, the section goes on
        compiled = [k for k in providers if k.startswith("compile")]
        rec.add(**dict(rows[0], provider=",".join(compiled) or "*"))
        if compiled:  # torch.compile is the likeliest to fail: time the others without it
            rec.note(f"{case}: {rows[0]['error']}; timing again without {compiled}")
            _time_providers(rec, args, section, case, _drop_compile(providers, False), nbytes, **extra)
        return
    for row in rows:
        rec.add(**row)
    line = ", ".join(f"{r['provider']} {r['median_ms']:.4f}" for r in rows)
    print(f"{case}: {line} ms", flush=True)


def _drop_compile(providers: dict, keep: bool) -> dict:
    return providers if keep else {k: v for k, v in providers.items() if not k.startswith("compile")}


def _section_kernels(args, rec: Recorder) -> None:
    import torch
    from kernel_cases import activation_case, histogram_case

    dev = args.device
    names = _backends_for(dev)
    rec.data["backends"] = names
    # copy bandwidth: one >= 1 GiB buffer copied device to device (bytes read + written)
    elems = (1 << 20) if args.tiny else (1 << 28)  # fp32: 4 MiB / 1 GiB
    buffers = [torch.empty(elems, device=dev).uniform_(-1, 1), torch.empty(elems, device=dev)]
    _time_providers(rec, args, "bandwidth", f"copy {elems * 4 / 2**30:.3g} GiB",
                    {"copy_": lambda: buffers[1].copy_(buffers[0])}, 2 * elems * 4, dtype="float32")
    buffers.clear()
    hist_shape = (2, 8, 12, 12) if args.tiny else (256, 128, 56, 56)
    act_shape = (2, 8, 12, 12) if args.tiny else (256, 64, 56, 56)
    for dtype in (torch.float32, torch.bfloat16):
        if rec.time_left() < 8:
            rec.note(f"kernels: out of budget before sign_histogram {dtype}")
            break
        case = f"sign_histogram {'x'.join(map(str, hist_shape))} {str(dtype)[6:]}"
        try:
            providers = histogram_case(hist_shape, dtype=dtype, device=dev)
        except Exception as exc:  # noqa: BLE001
            rec.add(section="histogram", case=case, provider="*", error=_error_line(exc))
            continue
        # the dry run compiles (dynamo, eager backend) the first case of each kind only: the same code path
        keep = rec.time_left() > 30 and not (args.tiny and dtype != torch.float32)
        providers = _drop_compile(_per_backend(providers, names), keep)
        nbytes = torch.Size(hist_shape).numel() * (4 if dtype == torch.float32 else 2)
        _time_providers(rec, args, "histogram", case, providers, nbytes, dtype=str(dtype)[6:])
        torch.cuda.empty_cache() if dev == "cuda" else None
    for kind in ("relu", "gelu", "silu"):
        if rec.time_left() < 8:
            rec.note(f"kernels: out of budget before activation {kind}")
            break
        case = f"activation+histogram {kind} {'x'.join(map(str, act_shape))} float32"
        try:
            providers = activation_case(kind, act_shape, device=dev)
        except Exception as exc:  # noqa: BLE001
            rec.add(section="activation", case=case, provider="*", error=_error_line(exc))
            continue
        keep = rec.time_left() > 25 and not (args.tiny and kind != "relu")
        providers = _drop_compile(_per_backend(providers, names), keep)
        nbytes = 2 * torch.Size(act_shape).numel() * 4  # x read, y written
        _time_providers(rec, args, "activation", case, providers, nbytes, dtype="float32", kind=kind)


def _optim_bytes(optimizer, words: int) -> int:
    """``words`` parameter-sized reads + writes per element, plus one byte per mask element (the bool masks
    the ``nepenthe`` provider holds; ``nepenthe_packed`` reads 1/8 byte instead, so its rate counts 7/8 byte
    per element it does not move: under 1/28 of the total)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    mask_of = getattr(optimizer, "_mask_of", lambda p: None)
    return sum(p.numel() * p.element_size() * words + (0 if mask_of(p) is None else p.numel()) for p in params)


def _section_optim(args, rec: Recorder) -> None:
    import torch
    from kernel_cases import adamw_case, sgd_case

    dev = args.device
    names = _backends_for(dev)
    rec.data["backends"] = names
    settings = {"SGD": dict(lr=0.01, momentum=0.9, weight_decay=5e-4), "AdamW": dict(lr=1e-3, weight_decay=1e-2)}
    # SGD-momentum: p r/w, grad r, buffer r/w; AdamW: p r/w, grad r, exp_avg r/w, exp_avg_sq r/w
    plan = [(dtype, opt, build, words) for dtype in (torch.float32, torch.bfloat16)
            for opt, build, words in (("SGD", sgd_case, 5), ("AdamW", adamw_case, 7))]
    for dtype, opt, build, words in plan:
        case = f"masked {opt} step ResNet-18 {str(dtype)[6:]}"
        if rec.time_left() < 8:
            rec.note(f"optim: out of budget before {case}")
            continue
        try:
            providers = build(device=dev, dtype=dtype)
            ours = getattr(providers.get("nepenthe"), "__self__", None)  # the bound MaskedSGD/AdamW.step
            if ours is None:
                raise RuntimeError("kernel_cases' 'nepenthe' provider is no optimizer's bound step")
            nbytes = _optim_bytes(ours, words)
            if "torch_fused_unmasked" not in providers:  # torch's fused step over the same parameters
                plist = [p for group in ours.param_groups for p in group["params"]]
                try:
                    providers["torch_fused_unmasked"] = getattr(torch.optim, opt)(plist, fused=True,
                                                                                  **settings[opt]).step
                except Exception as exc:  # noqa: BLE001 - e.g. no fused kernel for this device / dtype
                    rec.note(f"{case}: torch fused {opt} unavailable: {_error_line(exc)}")
        except Exception as exc:  # noqa: BLE001
            rec.add(section="optim", case=case, provider="*", error=_error_line(exc))
            continue
        # torch.compile of an optimizer step is the slowest compile here: fp32 only, and only with time left
        keep_compile = dtype == torch.float32 and rec.time_left() > 45
        providers = _drop_compile(_per_backend(providers, names), keep_compile)
        _time_providers(rec, args, "optim", case, providers, nbytes, dtype=str(dtype)[6:], optimizer=opt)
        del providers, ours
        if dev == "cuda":
            torch.cuda.empty_cache()


def _section_measure(args, rec: Recorder) -> None:
    from kernel_cases import measure_case

    dev = args.device
    names = _backends_for(dev)
    batch, batches = (2, 1) if args.tiny else (256, 4)
    case = f"measure ResNet-18 batch {batch} x {batches}"
    try:
        providers = _per_backend(measure_case(batch, batches, device=dev), names, key="nepenthe_measure")
    except Exception as exc:  # noqa: BLE001
        rec.add(section="measure", case=case, provider="*", error=_error_line(exc))
        return
    _time_providers(rec, args, "measure", case, providers, None, batch=batch)


def _section_fold(args, rec: Recorder) -> None:
    from nepenthe import benchmark as nb
    from nepenthe.benchmark.results import _progress_line

    dev = args.device
    if args.tiny:
        scenarios, batches, planner = ["mlp_block"], [1, 2], "all"  # the same code path, a small model
    else:
        scenarios, batches, planner = ["resnet18", "mobilenet_v2", "vgg16_bn", "mlp_block"], [1, 256], None
    keep = ("scenario", "batch", "mode", "before_ms", "before_iqr_ms", "after_ms", "after_iqr_ms", "speedup",
            "time_ratio", "flops_ratio", "rectifier_layers_removed", "returned", "max_rel_error", "fold_s",
            "planner_s", "compile_before_s", "compile_after_s", "error")
    # eager for every scenario and batch first, then torch.compile while time lasts (a compile pair costs most)
    for mode, need in (("eager", 10), ("compile", 60 if not args.tiny else 5)):
        for scenario in scenarios:
            for batch in batches:
                if rec.time_left() < need:
                    rec.note(f"fold: out of budget before {scenario} batch {batch} {mode}")
                    continue
                try:
                    result = nb.run_suite([scenario], batches=[batch], modes=[mode], device=dev, repeats=args.repeats,
                                          warmup=args.warmup, planner=planner, threads=args.threads)
                except Exception as exc:  # noqa: BLE001
                    rec.add(section="fold", scenario=scenario, batch=batch, mode=mode, error=_error_line(exc))
                    continue
                for row in result["rows"]:
                    rec.add(section="fold", **{k: row.get(k) for k in keep})
                    print(_progress_line(row), flush=True)


SECTIONS = {"env": _section_env, "parity": _section_parity, "kernels": _section_kernels, "optim": _section_optim,
            "measure": _section_measure, "fold": _section_fold}


def run_section(args) -> int:
    work = Path(args.work)
    rec = Recorder(work / f"{args.section}.json", args.section, args.budget)
    sys.path.insert(0, str(ROOT / "bench"))
    if args.section != "env":
        import torch

        if args.compile_backend != "inductor":  # dry run: dynamo traces, no inductor code generation
            import functools
            torch.compile = functools.partial(torch.compile, backend=args.compile_backend)
        if args.tiny:  # the dry run's ResNet-18 (optimizer parameters, measure): width 8, the same code paths
            import functools

            import kernel_cases

            from nepenthe.models import resnet18_cifar
            if hasattr(kernel_cases, "resnet18_cifar"):
                kernel_cases.resnet18_cifar = functools.partial(resnet18_cifar, width=8)
            # and timed blocks of ~2 ms instead of 20 (sized on the first provider, they can be far longer)
            latency = importlib.import_module("nepenthe.latency")  # the module (nepenthe.latency is also a function)
            latency._auto_number = functools.partial(latency._auto_number, target_s=0.002)
        torch.manual_seed(0)
        if args.threads:
            torch.set_num_threads(args.threads)
    SECTIONS[args.section](args, rec)
    rec.data["done"] = True
    rec.data["seconds"] = round(time.monotonic() - rec.start, 1)
    rec.flush()
    return 0


def check_targets(by_case: dict, fold_rows: list) -> list[dict]:
    """The issue's targets from the timings (``by_case[case][provider]`` rows with ``median_ms``, and
    ``pct_copy_bw`` where bytes are known) and the fold rows; ``met`` is None where a baseline is missing."""
    out = []

    def add(target, backend, measured, bound, higher_is_better, unit, case):
        met = None if measured is None else (measured >= bound if higher_is_better else measured <= bound)
        out.append({"target": target, "backend": backend, "case": case, "measured": measured, "bound": bound,
                    "unit": unit, "met": met})

    for case, prov in by_case.items():
        mine = {k[len("nepenthe["):-1]: v for k, v in prov.items() if k.startswith("nepenthe[")}
        for backend, r in mine.items():
            if case.startswith("sign_histogram"):
                add(f"histogram {case.split()[-1]} >= {HIST_TARGET_PCT:.0f}% copy bw", backend,
                    r.get("pct_copy_bw"), HIST_TARGET_PCT, True, "% bw", case)
            elif case.startswith("activation+histogram"):
                base = prov.get("torch_activation_only")
                add(f"fused {case.split()[1]} <= {ACT_TARGET_RATIO:.2f}x plain activation", backend,
                    r["median_ms"] / base["median_ms"] if base else None, ACT_TARGET_RATIO, False, "x", case)
            elif case.startswith("masked"):
                label = " ".join(case.split()[1:2] + case.split()[-1:])
                add(f"masked {label} >= {OPT_TARGET_PCT:.0f}% copy bw", backend, r.get("pct_copy_bw"),
                    OPT_TARGET_PCT, True, "% bw", case)
                base = prov.get("torch_fused_unmasked")
                add(f"masked {label} <= {OPT_TARGET_RATIO:.2f}x torch fused unmasked", backend,
                    r["median_ms"] / base["median_ms"] if base else None, OPT_TARGET_RATIO, False, "x", case)
        for k, r in prov.items():
            if k.startswith("nepenthe_measure["):
                base = prov.get("torch_forward")
                add(f"measure <= {MEASURE_TARGET_RATIO:.2f}x plain forward", k[len("nepenthe_measure["):-1],
                    r["median_ms"] / base["median_ms"] if base else None, MEASURE_TARGET_RATIO, False, "x", case)
    for r in fold_rows:
        if r.get("time_ratio") is not None:
            add(f"folded {r['scenario']} b{r['batch']} {r['mode']} never slower", "-", r["time_ratio"],
                FOLD_TARGET_RATIO, False, "after/before", f"fold {r['scenario']}")
    return out



def first_error(lines: list[str]) -> str | None:
    """The compiler's first error in a build log (nvcc ``file.cu(12): error: ...``, gcc ``file.cpp:3:4: error:
    ...``, ``fatal error``, MSVC-style ``error C2065``) with the three lines after it, or None."""
    pattern = re.compile(r"(error\s*:|fatal error|\berror [A-Z]+\d+)", re.I)
    first = next((i for i, ln in enumerate(lines) if pattern.search(ln)), None)
    return "\n".join(lines[first:first + 4]) if first is not None else None


def parse_pytest(text: str) -> dict:
    """Counts of pytest's final summary line (``3 failed, 10 passed, 2 skipped in 4.1s``), the line itself and
    the ``FAILED`` / ``ERROR`` lines of its short summary."""
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors", "xfailed", "xpassed")}
    last = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|errors?|skipped|deselected)", ln)]
    for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", last[-1] if last else ""):
        counts["errors" if kind.startswith("error") else kind] += int(n)
    return dict(counts, summary=last[-1].strip("= ") if last else "no summary line (killed? see steps.log)",
                failures=[ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))][:40],
                skips=[ln[:240] for ln in text.splitlines() if ln.startswith("SKIPPED")][:8])  # -rs groups reasons


# =============================================================================================================
# the orchestrator (no torch import: it only starts, times out and reads its steps)
# =============================================================================================================
class Suite:
    def __init__(self, args):
        self.args = args
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="gpu_suite."))
        self.steps: dict[str, dict] = {}
        self.step_logs: list[str] = []
        self.tests: dict[str, dict] = {}
        self.build: dict = {}
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env.pop("NEPENTHE_BACKEND", None)
        if args.device == "cuda":
            self.env.pop("TRITON_INTERPRET", None)
        self.only = set(args.only.split(",")) if args.only else set(ALL_STEPS)

    def left(self) -> float:
        return self.deadline - time.monotonic() - REPORT_RESERVE_S

    def say(self, text: str) -> None:
        print(f"[gpu_suite {time.monotonic() - self.start:6.1f}s] {text}", flush=True)

    def step_timeout(self, name: str) -> float:
        return min(STEP_BUDGETS[name], self.left())

    # --- processes ----------------------------------------------------------------------------------------
    def spawn(self, cmd: list[str], log: Path, extra_env: dict | None = None) -> subprocess.Popen:
        env = dict(self.env, **(extra_env or {}))
        f = open(log, "w")  # noqa: SIM115 - closed in wait()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        proc._log_file = f  # type: ignore[attr-defined]
        return proc

    @staticmethod
    def wait(proc: subprocess.Popen, timeout: float, grace: float = 3.0) -> tuple[int | None, bool]:
        """(exit code, timed out). A process still running after ``timeout`` gets SIGINT (pytest then prints
        what it has), ``grace`` seconds later SIGTERM, then SIGKILL; whatever is left of its process group is
        killed at the end. Signals go to the group this suite started for the step (start_new_session) only."""
        try:
            rc = proc.wait(timeout=max(0.1, timeout))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, patience in ((signal.SIGINT, grace), (signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    proc.wait(timeout=patience)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.returncode
        try:  # whatever the step left behind in its group (background jobs, compile workers)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        log_file = getattr(proc, "_log_file", None)
        if log_file is not None:
            log_file.close()
        return rc, timed_out

    def record(self, name: str, status: str, seconds: float, note: str = "", log: Path | None = None) -> dict:
        entry = {"status": status, "seconds": round(seconds, 1), "note": note}
        self.steps[name] = entry
        self.say(f"{name}: {status} in {seconds:.1f}s{' - ' + note if note else ''}")
        if log is not None and log.exists():
            tail = log.read_text(errors="replace").splitlines()[-40:]
            self.step_logs.append(f"===== {name}: {status} ({seconds:.1f} s) =====\n" + "\n".join(tail))
        return entry

    def skip(self, name: str, why: str) -> None:
        self.record(name, "skipped", 0.0, why)

    def run_section(self, name: str) -> None:
        if name not in self.only:
            return
        timeout = self.step_timeout(name)
        if timeout < 5:
            self.skip(name, "no time left in the budget")
            return
        a = self.args
        cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--work", str(self.work),
               "--device", a.device, "--budget", str(max(1.0, timeout - 5)), "--repeats", str(a.repeats),
               "--warmup", str(a.warmup), "--compile-backend", a.compile_backend]
        if a.tiny:
            cmd.append("--tiny")
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        log = self.work / f"{name}.log"
        t0 = time.monotonic()
        rc, timed_out = self.wait(self.spawn(cmd, log), timeout)
        data = self.section_data(name)
        rows = len(data.get("rows", []))
        if timed_out:
            status, note = "timeout", f"killed after {timeout:.0f} s; {rows} rows kept"
        elif rc != 0 or not data.get("done"):
            status, note = "failed", f"exit {rc}; {rows} rows kept; {self.last_error(log)}"
        else:
            status, note = "ok", f"{rows} rows"
        if name == "env" and data.get("env"):
            e = data["env"]
            note = f"{e.get('gpu') or 'no GPU'}; pytest {e.get('have_pytest')}, xdist {e.get('have_xdist')}, " \
                   f"pytest-timeout {e.get('have_pytest_timeout')}"
        if name == "parity" and data.get("parity"):
            p = data["parity"]
            races = [r for r in data["rows"] if r.get("kind") == "race"]
            note = (f"{p['checks'] - p['failed']}/{p['checks']} parity checks, "
                    f"{sum(bool(r.get('ok')) for r in races)}/{len(races)} race checks ok on {data.get('backends')}")
            if p["failed"] or not all(r.get("ok") for r in races):
                status = "FAILED" if status == "ok" else status
        self.record(name, status, time.monotonic() - t0, note, log)

    def section_data(self, name: str) -> dict:
        path = self.work / f"{name}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    @staticmethod
    def last_error(log: Path) -> str:
        try:
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no log"
        errs = [ln for ln in lines if re.search(r"Error|error", ln)]
        return (errs[-1] if errs else (lines[-1] if lines else "no output")).strip()[:200]

    # --- build -------------------------------------------------------------------------------------------
    def start_build(self) -> subprocess.Popen | None:
        if "build" not in self.only:
            return None
        log = self.work / "build.log"
        cmd, extra = self.build_command()
        self.build = {"command": " ".join(cmd), "env": extra, "t0": time.monotonic(), "log": log}
        self.say(f"build: {' '.join(f'{k}={v}' for k, v in extra.items() if k != 'PATH')} {' '.join(cmd)} (background)")
        return self.spawn(cmd, log, extra)

    def build_command(self) -> tuple[list[str], dict]:
        """(command, extra environment) of the build step: the sm_90 extension build on the GPU machine, the
        nvcc compile check of every .cu in the dry run."""
        if self.args.dry_run:
            return ["bash", str(ROOT / "scripts" / "check_gpu_build.sh")], {"PYTHON": sys.executable}
        # ninja (torch's BuildExtension) is found on PATH: the python's own bin directory first (a venv's ninja)
        path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
        return ([sys.executable, "setup.py", "build_ext", "--inplace"],
                {"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": str(min(16, os.cpu_count() or 1)), "PIP_NO_INDEX": "1",
                 "PATH": path})

    def finish_build(self, proc: subprocess.Popen | None) -> None:
        if proc is None:
            if "build" in self.only:
                self.skip("build", "not started")
            return
        timeout = min(STEP_BUDGETS["build"] - (time.monotonic() - self.build["t0"]), self.left())
        rc, timed_out = self.wait(proc, timeout)
        log: Path = self.build.pop("log")
        text = log.read_text(errors="replace") if log.exists() else ""
        lines = text.splitlines()
        self.build["first_error"] = first_error(lines)
        self.build["rc"] = rc
        so = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "nepenthe").glob("_C*.so"))
        if self.args.dry_run:
            summary = next((ln for ln in lines if ln.startswith("check_gpu_build:")), "")
            ok = rc == 0 and "check_gpu_build: all" in summary
            status = "skipped" if "SKIP" in summary else ("ok" if ok else ("timeout" if timed_out else "FAILED"))
            note = summary
        else:
            ok = rc == 0 and bool(so)
            status = "ok" if ok else ("timeout" if timed_out else "FAILED")
            note = ", ".join(so) if ok else (self.build["first_error"] or self.last_error(log)).splitlines()[0][:200]
        if status in ("ok", "skipped"):  # an "error:" in a successful build's log is no build error
            self.build["first_error"] = None
        self.build.update(status=status, extension=so)
        self.record("build", status, time.monotonic() - self.build.pop("t0"), note)
        with open(self.out / "build.log", "w") as f:
            settings = " ".join(f"{k}={v}" for k, v in self.build["env"].items() if k != "PATH")
            f.write(f"# build: {status} (exit {rc}{', timed out' if timed_out else ''})\n"
                    f"# command: {settings} {self.build['command']}\n")
            f.write(f"# first error:\n{self.build['first_error'] or '(none)'}\n# ----- last 150 lines -----\n")
            f.write("\n".join(lines[-150:]) + "\n")

    # --- tests -------------------------------------------------------------------------------------------
    def have(self, module: str) -> bool:
        env = self.section_data("env").get("env", {})
        key = f"have_{module}"
        if key in env:
            return env[key] is not None
        return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                              env=self.env).returncode == 0

    def pytest_cmd(self, which: str, collect_only: bool) -> list[str]:
        paths, expr = TEST_SELECTIONS[which]
        cmd = [sys.executable, "-m", "pytest", *paths, "-k", expr, "-q", "-o", "addopts=", "-p", "no:cacheprovider"]
        if collect_only:
            return cmd + ["--collect-only"]
        cmd += ["-rfEs", "--tb=line"]
        if self.have("xdist"):
            cmd += ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]
        if self.have("pytest_timeout"):
            cmd += ["--timeout", "120"]
        return cmd

    def run_tests(self, which: str, step: str) -> None:
        if step not in self.only:
            return
        timeout = self.step_timeout(step)
        if timeout < 10:
            self.skip(step, "no time left in the budget")
            return
        if not self.have("pytest"):
            paths, expr = TEST_SELECTIONS[which]
            self.tests[which] = {"selection": {"paths": paths, "k": expr},
                                 "summary": "not run: pytest is not installed here; the fallback is the built-in "
                                            "parity step (every GPU backend vs the reference) and its race check"}
            self.skip(step, "pytest not installed; fallback: built-in parity checks (step parity)")
            return
        collect = self.args.dry_run
        cmd = self.pytest_cmd(which, collect)
        log = self.work / f"{step}.log"
        t0 = time.monotonic()
        rc, timed_out = self.wait(self.spawn(cmd, log), timeout - 10, grace=8.0)
        text = log.read_text(errors="replace") if log.exists() else ""
        info = {"selection": {"paths": TEST_SELECTIONS[which][0], "k": TEST_SELECTIONS[which][1]},
                "command": shlex.join(cmd[1:]), "rc": rc, "timed_out": timed_out, "collect_only": collect}
        if collect:
            m = re.search(r"(\d+)(?:/(\d+))? tests? collected", text)
            info["collected"] = int(m.group(1)) if m else 0
            ok = rc == 0 and info["collected"] > 0
            info["summary"] = f"{info['collected']} tests collected" if m else "no tests collected"
            info["node_ids"] = [ln for ln in text.splitlines() if "::" in ln]
        else:
            info.update(parse_pytest(text))
            ok = rc == 0 and info["passed"] > 0
        self.tests[which] = info
        status = "ok" if ok else ("timeout" if timed_out else "FAILED")
        self.record(step, status, time.monotonic() - t0, f"[{which}] {info['summary']}", log)
        info["tail"] = text.splitlines()[-15:] if not ok else []

    # --- the whole run -----------------------------------------------------------------------------------
    def run(self) -> int:
        self.say(f"work dir {self.work}, budget {self.args.budget:.0f} s, device {self.args.device}"
                 f"{' (dry run)' if self.args.dry_run else ''}")
        self.run_section("env")
        build = self.start_build()
        if self.args.dry_run:
            # no GPU tests to run: collect both selections while nvcc compiles; the build is joined last
            self.run_tests("triton", "tests")
            self.run_tests("cuda", "tests_cuda")
            for name in BENCH_SECTIONS:
                self.run_section(name)
            self.finish_build(build)
        else:
            self.run_tests("triton", "tests")  # the Triton tests need no extension: run while it compiles
            self.finish_build(build)
            if self.build.get("status") in (None, "ok"):
                self.run_tests("cuda", "tests_cuda")
            elif "tests_cuda" in self.only:
                self.skip("tests_cuda", f"build {self.build.get('status')}: no CUDA C++ backend to test")
            for name in BENCH_SECTIONS:
                self.run_section(name)
        return self.report()

    # --- report ------------------------------------------------------------------------------------------
    def report(self) -> int:
        env = self.section_data("env").get("env", {})
        rows = []
        for name in ("kernels", "optim", "measure"):
            rows += [r for r in self.section_data(name).get("rows", []) if r.get("median_ms") or r.get("error")]
        fold_rows = self.section_data("fold").get("rows", [])
        parity = self.section_data("parity")
        bw = next((r for r in rows if r.get("section") == "bandwidth" and r.get("median_ms")), None)
        copy_gbs = bw["bytes"] / (bw["median_ms"] * 1e-3) / 1e9 if bw else None
        by_case: dict[str, dict] = {}
        for r in rows:
            if r.get("median_ms") and r.get("bytes"):
                r["gb_per_s"] = r["bytes"] / (r["median_ms"] * 1e-3) / 1e9
                r["pct_copy_bw"] = 100 * r["gb_per_s"] / copy_gbs if copy_gbs else None
            if r.get("median_ms"):
                by_case.setdefault(r["case"], {})[r["provider"]] = r
        targets = check_targets(by_case, fold_rows)
        result = {"environment": env, "dry_run": self.args.dry_run, "device": self.args.device,
                  "budget_s": self.args.budget, "elapsed_s": round(time.monotonic() - self.start, 1),
                  "steps": self.steps, "build": self.build, "tests": self.tests,
                  "parity": {"summary": parity.get("parity"), "backends": parity.get("backends"),
                             "rows": parity.get("rows", [])},
                  "copy_gb_per_s": copy_gbs, "rows": rows, "fold_rows": fold_rows, "targets": targets,
                  "notes": sum((self.section_data(n).get("notes", []) for n in BENCH_SECTIONS), [])}
        (self.out / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        self.write_csv(rows, fold_rows)
        self.write_tests()
        (self.out / "steps.log").write_text("\n\n".join(self.step_logs)[-400_000:] + "\n")
        table = self.table(result)
        (self.out / "summary.md").write_text(table + "\n")
        shutil.rmtree(self.work, ignore_errors=True)
        print("\n" + table, flush=True)
        return 0

    def write_csv(self, rows: list, fold_rows: list) -> None:
        from nepenthe.benchmark import write_measurements

        # the package's measurement schema, then this suite's own columns; a fold row becomes two
        # provider rows (the model and its folded form), as the latency suite's measurements.csv has them
        extra = ["section", "dtype", "pct_copy_bw", "scenario", "batch", "mode", "returned"]
        fold_as_rows = []
        for r in fold_rows:
            case = f"fold {r.get('scenario')} batch {r.get('batch')} {r.get('mode')}"
            for provider, ms in (("model", r.get("before_ms")), ("folded", r.get("after_ms"))):
                fold_as_rows.append(dict(r, suite="gpu_suite", section="fold", case=case, provider=provider,
                                         median_ms=ms, relative=(ms / r["before_ms"]) if ms and r.get("before_ms")
                                         else None))
        write_measurements(list(rows) + fold_as_rows, self.out / "results.csv", extra)

    def write_tests(self) -> None:
        lines = []
        for which, info in self.tests.items():
            lines.append(f"== {which}: {info['summary']}")
            if "command" in info:
                lines.append(f"   python {info['command']}")
            lines += [f"   {ln}" for ln in info.get("failures", []) + info.get("skips", [])]
            lines += [f"   | {ln}" for ln in info.get("tail", [])]
        parity = self.section_data("parity")
        if parity.get("parity"):
            p = parity["parity"]
            passed = p["checks"] - p["failed"]
            lines.append(f"== built-in parity on {parity.get('backends')}: {passed}/{p['checks']} ok")
            lines += [f"   FAILED {r['backend']} {r['check']}: {r.get('error')}" for r in parity.get("rows", [])
                      if not r.get("ok")][:40]
        (self.out / "tests.txt").write_text("\n".join(lines) + "\n")

    def table(self, result: dict) -> str:
        env = result["environment"]
        f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        dry = " (DRY RUN on CPU, tiny sizes: numbers mean nothing)" if result["dry_run"] else ""
        g = lambda k: env.get(k) or "-"  # noqa: E731
        head = (f"# nepenthe GPU suite{dry}\n\n{env.get('gpu') or env.get('device') or '-'}, driver {g('driver')}, "
                f"torch {g('torch')} (CUDA {g('torch_cuda')}), triton {g('triton')}, {env.get('nvcc') or 'no nvcc'}, "
                f"python {g('python')}, {g('cpu_count')} CPUs, {g('date')}, commit {g('git_commit')}; "
                f"elapsed {result['elapsed_s']:.0f} s of {result['budget_s']:.0f}")
        out = [head, "", "| step | status | s | note |", "|---|---|---|---|"]
        out += [f"| {k} | {v['status']} | {v['seconds']:.0f} | {v['note'].replace('|', '/')[:110]} |"
                for k, v in result["steps"].items()]
        if result["build"].get("first_error"):
            out += ["", "build first error: `" + result["build"]["first_error"].splitlines()[0][:300] + "`"]
        copy = result["copy_gb_per_s"]
        if result["rows"]:
            out += ["", f"copy bandwidth (D2D, read + write): {f(copy, '.0f')} GB/s", "",
                    "| case | provider | ms | GB/s | % bw | time / ours |", "|---|---|---|---|---|---|"]
        cases: dict[str, list] = {}
        for r in result["rows"]:
            cases.setdefault(r["case"], []).append(r)
        for case, rs in cases.items():
            ref = next((r["median_ms"] for r in rs if r.get("median_ms") and r["provider"].startswith("nepenthe")),
                       None)
            for k, r in enumerate(rs):
                name = case if k == 0 else ""  # the case once, on its first provider's row
                if r.get("error"):
                    out.append(f"| {name} | {r['provider']} | error: {r['error'].replace('|', '/')[:120]} | | | |")
                    continue
                rel = r["median_ms"] / ref if ref else None
                out.append(f"| {name} | {r['provider']} | {r['median_ms']:.4f} | {f(r.get('gb_per_s'), '.0f')} | "
                           f"{f(r.get('pct_copy_bw'), '.1f')} | {f(rel, '.2f')} |")
        fold_checks = [t for t in result["targets"] if t["target"].startswith("folded ")]
        if result["fold_rows"]:
            out += ["", f"| fold | batch | mode | before ms | after ms | after/before (<= {FOLD_TARGET_RATIO:g}) "
                        "| gave |", "|---|---|---|---|---|---|---|"]
            for r in result["fold_rows"]:
                ratio = r.get("time_ratio")
                verdict = "" if ratio is None else (" met" if ratio <= FOLD_TARGET_RATIO else " NOT met")
                gave = (r.get("returned") or "-") if not r.get("error") else r["error"].replace("|", "/")[:100]
                out.append(f"| {r.get('scenario')} | {r.get('batch')} | {r.get('mode')} | "
                           f"{f(r.get('before_ms'), '.4f')} | {f(r.get('after_ms'), '.4f')} | "
                           f"{f(ratio, '.3f')}{verdict} | {gave} |")
        if result["targets"]:
            out += ["", "| target | backend | measured | bound | |", "|---|---|---|---|---|"]
        for t in result["targets"]:
            if t in fold_checks:
                continue
            verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
            out.append(f"| {t['target']} | {t['backend']} | {f(t['measured'], '.3f')} {t['unit']} | "
                       f"{t['bound']:g} | {verdict} |")
        if fold_checks:
            slower = [f"{t['target'][len('folded '):-len(' never slower')]} {t['measured']:.3f}"
                      for t in fold_checks if not t["met"]]
            verdict = "met" if not slower else "NOT met: " + ", ".join(slower)
            out.append(f"| folded models never slower ({len(fold_checks) - len(slower)}/{len(fold_checks)} rows) | - | "
                       f"max {max(t['measured'] for t in fold_checks):.3f} after/before | {FOLD_TARGET_RATIO:g} | "
                       f"{verdict} |")
        met = sum(t["met"] is True for t in result["targets"])
        out += ["", f"targets met: {met}/{len(result['targets'])} ({env.get('gpu') or env.get('device', '?')}); "
                    f"files: {', '.join(OUT_FILES)} in {self.out}"]
        return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="output directory (the orchestrator's)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, nvcc check instead of the build, "
                                                          "pytest --collect-only, torch.compile backend eager")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke run)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 470; dry 300)")
    p.add_argument("--only", default=None, help=f"comma-separated steps of {','.join(ALL_STEPS)}")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; dry: eager)")
    p.add_argument("--section", choices=tuple(SECTIONS), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny = args.device or "cpu", True
    args.device = args.device or "cuda"
    args.compile_backend = args.compile_backend or ("eager" if args.dry_run else "inductor")
    args.repeats = args.repeats or (2 if args.tiny else 15)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    # tiny CPU runs: one intra-op thread (an OpenMP region on a shared 2-core machine waits for time slices)
    args.threads = args.threads or (1 if args.tiny and args.device == "cpu" else None)
    if args.section:
        args.budget = args.budget or 60.0
        return run_section(args)
    if not args.out:
        p.error("OUT_DIR is required")
    if args.only and not set(args.only.split(",")) <= set(ALL_STEPS):
        p.error(f"--only takes steps of {','.join(ALL_STEPS)}")
    args.budget = args.budget or (300.0 if args.dry_run else 470.0)
    if args.device == "cpu" and not args.dry_run and not args.tiny:
        print("note: --device cpu without --tiny runs the GPU sizes on the CPU (slow)", flush=True)
    return Suite(args).run()


if __name__ == "__main__":
    sys.exit(main())
