"""Triton-only checks beyond the backend parity tests (test_backends.py).

* Every Triton kernel compiles ahead of time for an H100 (sm_90) on a machine without a GPU:
  ``scripts/aot_triton.py`` runs in a subprocess (with the interpreter off, which conftest switches
  on when there is no GPU), pushing every specialisation the GPU launchers can produce through
  Triton's full pipeline and ptxas. The parity tests check the numerics; this checks that the same
  kernels are valid GPU programs.
* The GPU launch plans (tile menu, unit-stride axis, grid sizing, 63-tile runs per program,
  multi-tensor chunking) are exercised through the interpreter too: without a GPU the launchers
  otherwise pick interpreter-sized plans.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch

from nepenthe.ops import backends, reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "aot_triton.py")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_every_triton_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia", reason="this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = max(1, min(8, os.cpu_count() or 1))
    proc = subprocess.run([sys.executable, SCRIPT, "--arch", "90", "--jobs", str(jobs)], capture_output=True,
                          text=True, env=env, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"AOT compilation failed (exit {proc.returncode}):\n" + "\n".join(
        line for line in out.splitlines() if not line.startswith("ok "))[-8000:]
    summary = out.strip().splitlines()[-1]
    assert "kernels compiled for sm_90" in summary and "FAILED" not in summary, summary
    compiled, total = summary.split()[0].split("/")
    assert compiled == total and int(total) > 0, summary


# ----- GPU launch plans through the interpreter ------------------------------------------------------------
@pytest.fixture
def gpu_plans(monkeypatch):
    """The triton backend, its launchers forced onto their GPU plans (3 programs 'fill the GPU', optimizer
    chunks of 256 elements in blocks of 64)."""
    try:
        impl = backends.load("triton")
    except backends.BackendUnavailable as exc:
        pytest.skip(str(exc))
    if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton without a GPU needs TRITON_INTERPRET=1")
    sh = importlib.import_module(impl.__name__ + ".sign_histogram")
    mo = importlib.import_module(impl.__name__ + ".masked_optim")
    monkeypatch.setattr(sh, "_interpreting", lambda t: False)
    monkeypatch.setattr(sh, "_target_programs", lambda device: 3)
    monkeypatch.setattr(mo, "_block_and_chunk", lambda numels, device: (64, 256, 4))
    mo.clear_cache()
    yield impl, sh
    mo.clear_cache()


def _values(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 4
    x[torch.rand(shape, generator=g) < 0.15] = 0.0
    x[torch.rand(shape, generator=g) < 0.1] = 6.0
    x[torch.rand(shape, generator=g) < 0.02] = math.nan
    x[torch.rand(shape, generator=g) < 0.02] = math.inf
    return x.to(dtype=dtype, device=DEVICE)


def _reference_hist(x3, upper, bins):
    h = torch.zeros(x3.shape[1], bins, dtype=torch.int64)
    reference.sign_histogram_(h, x3.cpu(), upper)
    return h


LAYOUTS = {  # id -> (x builder, channel dim): every unit axis and both tile shapes of the GPU menu
    "nchw_7x7": (lambda d: _values((3, 70, 7, 7), d), 1),
    "nchw_few_channels": (lambda d: _values((2, 3, 40, 40), d), 1),
    "channels_last": (lambda d: _values((2, 70, 5, 6), d).to(memory_format=torch.channels_last), 1),
    "tokens_few_channels": (lambda d: _values((700, 3), d), 1),
    "stride0": (lambda d: _values((1, 5, 1, 1), d).expand(4, 5, 9, 11), 1),
    "strided": (lambda d: _values((5, 9, 21), d).permute(2, 0, 1), 1),
}


@pytest.mark.parametrize("lid", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_plans_match_reference(gpu_plans, lid, dtype):
    impl, sh = gpu_plans
    make, dim = LAYOUTS[lid]
    x3 = reference.as_3d(make(dtype), dim)
    hist = torch.zeros(x3.shape[1], 5, dtype=torch.int64, device=DEVICE)
    impl.sign_histogram_(hist, x3, 6.0)
    torch.testing.assert_close(hist.cpu(), _reference_hist(x3, 6.0, 5), rtol=0, atol=0)
    y3 = torch.empty_like(x3) if lid != "stride0" else torch.empty(x3.shape, dtype=dtype, device=DEVICE)
    hist.zero_()
    kind = reference.ACTIVATIONS.index("silu")
    impl.activation_histogram_(x3, y3, hist, kind, 0.0, None)
    torch.testing.assert_close(hist.cpu(), _reference_hist(x3, None, 5), rtol=0, atol=0)
    want = reference.activation(x3.double(), "silu")
    torch.testing.assert_close(y3.double(), want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5,
                               equal_nan=True)


def test_gpu_plans_full_runs_of_63_tiles(gpu_plans, monkeypatch):
    """Each program walks the most tiles the packed 6-bit counters allow; every field saturates."""
    impl, sh = gpu_plans
    monkeypatch.setattr(sh, "_target_programs", lambda device: 1)
    n = 126 * 1024 - 5
    for x3 in (torch.tensor([7.0, -1.0, 0.0, math.inf], device=DEVICE).view(1, 4, 1).expand(1, 4, n),
               torch.tensor([7.0, -1.0, 0.0, math.nan], device=DEVICE).repeat(n).view(1, n, 4).transpose(1, 2)):
        plan = sh.plan(x3)
        assert plan.tiles_per_prog == sh.FIELD_MAX and plan.n_tiles == 2 * sh.FIELD_MAX, plan
        hist = torch.zeros(4, 5, dtype=torch.int64, device=DEVICE)
        impl.sign_histogram_(hist, x3, 6.0)
        torch.testing.assert_close(hist.cpu(), _reference_hist(x3, 6.0, 5), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_gpu_plans_optimizers_whole_chunks_and_tails(gpu_plans, dtype):
    impl, _ = gpu_plans
    g = torch.Generator().manual_seed(0)
    shapes = [(300,), (513,), (1,), (0,), (16, 16)]  # several chunks, tails, a single element, nothing
    make = lambda: [torch.randn(s, generator=g).to(dtype=dtype, device=DEVICE) for s in shapes]
    params, grads, bufs, vs = make(), make(), make(), [t.abs() for t in make()]
    masks = [(torch.rand(s, generator=g) > 0.3).to(DEVICE) if i % 2 == 0 else None for i, s in enumerate(shapes)]
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]

    p1, b1 = [t.clone() for t in params], [t.clone() for t in bufs]
    p2, b2 = [t.clone() for t in params], [t.clone() for t in bufs]
    impl.masked_sgd_(p1, grads, b1, masks, 0.1, 0.9, 0.1, 1e-2, True, False, False)
    reference.masked_sgd_(p2, grads, b2, masks, 0.1, 0.9, 0.1, 1e-2, True, False, False)
    for a, b in zip(p1 + b1, p2 + b2):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)

    state1 = [[t.clone() for t in ts] for ts in (params, bufs, vs, vs)]
    state2 = [[t.clone() for t in ts] for ts in (params, bufs, vs, vs)]
    args = (1e-2, 0.9, 0.999, 1e-8, 1e-2, 3, True, False)
    impl.masked_adamw_(state1[0], grads, state1[1], state1[2], state1[3], masks, *args)
    reference.masked_adamw_(state2[0], grads, state2[1], state2[2], state2[3], masks, *args)
    for ts1, ts2 in zip(state1, state2):
        for a, b in zip(ts1, ts2):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
