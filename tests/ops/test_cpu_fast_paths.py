"""The C++ CPU backend's fast paths against the PyTorch reference, on the inputs that stress them.

* fp16 / bf16 sign counts work on the 16-bit patterns (AVX2 integer compares): every one of the
  65536 patterns (NaN, +-Inf, +-0, subnormals, the largest finite values) in every layout the engine
  has a path for (contiguous runs, channel-contiguous rows, flat rows with C not a multiple of 16,
  strided), with thresholds the pattern test takes (6, +Inf, a subnormal, the largest finite) and
  those it hands to the fp32 loops (0, -1, -Inf, NaN). Counts must be equal, not close.
* GELU (erf and tanh forms) and SiLU use branch-free polynomial exp / erf: accuracy over a dense
  range (the low-precision rule of tests/ops/test_backends.py), NaN for NaN and the limits at ±inf.
  Contiguous bf16 ones are a table lookup: every one of the 65536 patterns, exactly.

* Parallel loops at 2 threads, which run serially for a while after a region whose threads waited on
  each other (a loaded machine): the same results either way.

Sizes are odd so that every vector loop has a tail. With NEPENTHE_CPU_BASELINE=1 the same tests
run the baseline (non-AVX2) copies, with NEPENTHE_CPU_NO_AVX512=1 the AVX2 copies of the activation
blocks (both are also run here in a subprocess).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from nepenthe.ops import backends, reference
from nepenthe.ops.reference import ACTIVATIONS

try:
    CPP = backends.load("cpp")
except backends.BackendUnavailable as exc:  # pure-Python install
    CPP = None
    _REASON = str(exc)
pytestmark = pytest.mark.skipif(CPP is None, reason="the C++ CPU backend is not built")

LOW = [torch.float16, torch.bfloat16]


def _all_patterns(dtype: torch.dtype) -> torch.Tensor:
    """The 65536 values of a 16-bit float type, in bit-pattern order."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def _layouts(v: torch.Tensor):
    """(id, tensor, channel_dim) views of the 65536 values (plus a few repeats) for each engine path."""
    n = v.numel()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    v = v[perm]  # mix the special values among the channels
    out = [
        ("nchw", v.reshape(4, 8, 32, 64), 1),                                   # contiguous runs (path A)
        ("nchw_odd", torch.cat([v, v[:3 * 5 * 7 * 11 - n % (3 * 5 * 7 * 11)]])
         .reshape(-1, 5, 7, 11), 1),                                            # runs of 77: vector tails
        ("channels_last", v.reshape(4, 64, 16, 16).to(memory_format=torch.channels_last), 1),
        ("linear_2d", v.reshape(-1, 64), 1),                                    # rows of C = 64 (path B, flat)
        ("linear_c19", torch.cat([v, v[:19 - n % 19]]).reshape(-1, 19), 1),      # flat runs of lcm(19, 16) rows
        ("linear_c1", v.reshape(-1, 1), 1),
        ("linear_c3_tail", v[:3 * 1001].reshape(-1, 3), 1),                     # row count not a multiple of k
        ("tokens", v.reshape(16, 64, 64), -1),
        ("rows_sliced", v.reshape(-1, 128)[:, 3:99], 1),                         # row stride != C (path B, not flat)
        ("sliced", v.reshape(8, 16, 16, 32)[:, ::2, 1:, :-3], 1),               # strided runs
        ("transposed", v.reshape(64, 1024).t(), 1),
        ("channel_dim0", v.reshape(64, 32, 32), 0),
    ]
    return out


LAYOUT_IDS = [lid for lid, _, _ in _layouts(_all_patterns(torch.float16))]
UPPERS = [None, 6.0, math.inf, 1e-6, 65504.0, 3.0e38, 0.0, -1.0, -math.inf, math.nan, 1e-40]


def _check_counts(x: torch.Tensor, dim: int, upper, bins=5):
    x3 = reference.as_3d(x, dim)
    got = torch.zeros(x3.shape[1], bins, dtype=torch.int64)
    want = torch.zeros_like(got)
    CPP.sign_histogram_(got, x3, upper)
    reference.sign_histogram_(want, x3, upper)
    assert torch.equal(got, want), f"{x.dtype} upper={upper}: {(got - want).abs().sum(0).tolist()} off"


@pytest.mark.parametrize("lid", LAYOUT_IDS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_16bit_counts_every_pattern(dtype, lid):
    layouts = {i: (t, d) for i, t, d in _layouts(_all_patterns(dtype))}
    x, dim = layouts[lid]
    for upper in UPPERS:
        _check_counts(x, dim, upper)
    _check_counts(x, dim, None, bins=4)


@pytest.mark.parametrize("dtype", LOW + [torch.float32], ids=str)
@pytest.mark.parametrize("shape,dim,cl", [((3, 5, 7, 9), 1, False), ((3, 5, 7, 9), 1, True), ((2, 16, 3, 3), 1, True),
                                          ((1, 64, 1, 33), 1, True), ((1000, 37), 1, False), ((17,), 0, False),
                                          ((2, 3, 70001), 1, False), ((33, 48), -1, False)])
def test_counts_odd_sizes(dtype, shape, dim, cl):
    """Random values with exact zeros and ties at the threshold, in shapes that leave vector tails."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 4
    x[torch.rand(shape, generator=g) < 0.1] = 0.0
    x[torch.rand(shape, generator=g) < 0.1] = 6.0
    x[torch.rand(shape, generator=g) < 0.01] = math.nan
    x[torch.rand(shape, generator=g) < 0.01] = -math.inf
    x = x.to(dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    for upper in (None, 6.0):
        _check_counts(x, dim, upper)


def test_16bit_counts_large_runs_and_threads():
    """Runs longer than the int16 lane budget (16384 vectors) and a count split across threads."""
    torch.manual_seed(2)
    for dtype in LOW:
        x = (torch.randn(3, 2, 700_001) * 8).to(dtype)
        x[0, 0, ::7] = 0
        for threads in (1, 2):
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                _check_counts(x, 1, 6.0)
                _check_counts(x.transpose(1, 2).contiguous().transpose(1, 2), 1, 6.0)  # channels innermost
            finally:
                torch.set_num_threads(before)


# ----- fused activations ----------------------------------------------------------------------------------
def _tolerance(kind, x, got):
    from tests.ops.test_backends import _activation_tolerance
    _activation_tolerance(kind, x, got, 0.01)


def _run(kind, x, dim=1):
    x3 = reference.as_3d(x, dim)
    y = torch.empty_like(x)
    y3 = reference.as_3d(y, dim)
    hist = torch.zeros(x3.shape[1], 5, dtype=torch.int64)
    CPP.activation_histogram_(x3, y3, hist, ACTIVATIONS.index(kind), 0.01, reference.upper_kink(kind))
    want = torch.zeros_like(hist)
    reference.sign_histogram_(want, x3, reference.upper_kink(kind))
    assert torch.equal(hist, want)
    return y


SMOOTH = ["gelu", "gelu_tanh", "silu", "hardswish"]


@pytest.mark.parametrize("kind", SMOOTH)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_activation_accuracy_dense_range(kind, dtype, layout):
    """Every representable-ish value in [-20, 20] (and a sweep to +-100): within the low-precision rule."""
    v = torch.cat([torch.linspace(-20, 20, 60_001), torch.linspace(-100, 100, 4_001), torch.tensor([0.0, -0.0])])
    v = v[: v.numel() // 7 * 7].to(dtype)
    if layout == "contiguous":
        x = v.reshape(-1, 7, 1, 1)
    elif layout == "channels_last":
        x = v.reshape(-1, 7, 1, 1).to(memory_format=torch.channels_last)
    else:
        x = v.reshape(-1, 7)[::2, :]  # rows with a stride
    y = _run(kind, x)
    _tolerance(kind, x, y)


@pytest.mark.parametrize("kind", SMOOTH)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_activation_special_values(kind, dtype):
    """NaN, +-Inf, +-0 and huge finite values: PyTorch's results (fp64 PyTorch where its fp32 erf
    returns NaN for gelu(+inf), which is +inf mathematically and in libm)."""
    fin = torch.finfo(dtype)
    vals = [math.nan, math.inf, -math.inf, 0.0, -0.0, fin.tiny, -fin.tiny, 88.0, -88.0, 89.0, -89.0, 100.0, -100.0,
            1e4, -1e4, 3.0, -3.0]
    x = torch.tensor(vals * 3, dtype=torch.float32).to(dtype).reshape(-1, 1)  # 51 elements: vector + tail
    y = _run(kind, x)
    want = reference.activation(x.double(), kind).to(dtype)
    assert torch.equal(torch.isnan(y), torch.isnan(want)), (x[torch.isnan(y) != torch.isnan(want)].flatten())
    inf = torch.isinf(want)
    assert torch.equal(y[inf], want[inf])
    finite = torch.isfinite(want)
    torch.testing.assert_close(y[finite].double(), want[finite].double(), rtol=4 * fin.eps, atol=1e-6)
    # the largest finite values: PyTorch's own result in this dtype overflows for some kinds (x * 6 in
    # hardswish, x * 0.5 * 2 in gelu): either that or the fp64 result rounded is accepted
    big = torch.tensor([fin.max, -fin.max], dtype=dtype).reshape(-1, 1)
    y = _run(kind, big)
    same, exact = reference.activation(big, kind), reference.activation(big.double(), kind).to(dtype)
    assert bool(((y == same) | (y == exact)).all()), (y, same, exact)


@pytest.mark.skipif(os.environ.get("NEPENTHE_CPU_BASELINE") == "1",
                    reason="the baseline copies compute each element (the dense-range test covers them)")
@pytest.mark.parametrize("kind", SMOOTH)
@pytest.mark.parametrize("inplace", [False, True])
def test_bf16_table_activation_every_pattern(kind, inplace):
    """Contiguous bf16 GELU / GELU-tanh / SiLU / hardswish are a table lookup over the 65536 bit
    patterns: each output is the function in fp64 rounded to fp32 then bf16 (hardswish: PyTorch's own
    fp32 arithmetic), bit for bit, NaN for NaN, -0.0 at -inf; the counts are unchanged."""
    x = _all_patterns(torch.bfloat16).reshape(1, 1, -1)
    xd = x.double()
    if kind == "gelu":  # fp64 forms without cancellation in the negative tail (1 + erf, 1 + tanh lose it all)
        exact = 0.5 * xd * torch.special.erfc(-xd / math.sqrt(2))
    elif kind == "gelu_tanh":
        exact = xd * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (xd + 0.044715 * xd**3))
    elif kind == "silu":
        exact = xd * torch.sigmoid(xd)
    if kind != "hardswish":  # the limit at -inf (reference.activation), where -inf * 0 would be NaN
        exact = torch.where(xd == -math.inf, torch.tensor(-0.0, dtype=torch.float64), exact)
    want = (reference.activation(x.float(), kind) if kind == "hardswish" else exact.float()).to(torch.bfloat16)
    y3 = x.clone() if inplace else torch.empty_like(x)
    hist = torch.zeros(1, 5, dtype=torch.int64)
    CPP.activation_histogram_(y3 if inplace else x, y3, hist, ACTIVATIONS.index(kind), 0.01, None)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(y3), nan)
    assert torch.equal(y3[~nan].view(torch.int16), want[~nan].view(torch.int16)), \
        x[y3.view(torch.int16) != want.view(torch.int16)][:8]
    expected = torch.zeros(1, 5, dtype=torch.int64)
    reference.sign_histogram_(expected, x, None)
    assert torch.equal(hist[:, :4], expected[:, :4])


@pytest.mark.parametrize("kind", ["gelu", "silu"])
def test_activation_inplace_and_strided_output(kind):
    torch.manual_seed(0)
    x = torch.randn(3, 19, 5, 7) * 5
    x[0, 0, 0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    want = reference.activation(x, kind)
    # inplace
    z = x.clone()
    z3 = reference.as_3d(z, 1)
    hist = torch.zeros(19, 5, dtype=torch.int64)
    CPP.activation_histogram_(z3, z3, hist, ACTIVATIONS.index(kind), 0.01, None)
    # a channels_last input into a contiguous output (strided writes)
    xc = x.to(memory_format=torch.channels_last)
    y = torch.empty(x.shape)
    CPP.activation_histogram_(reference.as_3d(xc, 1), reference.as_3d(y, 1), torch.zeros(19, 5, dtype=torch.int64),
                              ACTIVATIONS.index(kind), 0.01, None)
    exact = reference.activation(x.double(), kind)
    # against fp64, within twice PyTorch's own fp32 error (its GELU is off by up to ~1.1e-6 in the
    # negative tail, where a comparison with its fp32 result would blame the more exact kernel)
    own = (want.double() - exact).abs()
    for got in (z, y):
        ok = torch.isfinite(want)
        err = (got.double() - exact).abs()[ok]
        assert bool((err <= torch.clamp(2 * own[ok], min=1e-6) + 1e-5 * exact.abs()[ok]).all()), float(err.max())
        assert torch.equal(torch.isnan(got), torch.isnan(reference.activation(x.double(), kind)))


@pytest.mark.skipif(os.environ.get("NEPENTHE_CPU_BASELINE") == "1" or os.environ.get("NEPENTHE_CPU_NO_AVX512") == "1",
                    reason="already in a subprocess with other copies")
@pytest.mark.parametrize("switch", ["NEPENTHE_CPU_BASELINE", "NEPENTHE_CPU_NO_AVX512"])
def test_other_copies_in_a_subprocess(switch):
    """The non-AVX2 copies (NEPENTHE_CPU_BASELINE=1) and, on an AVX-512 machine, the AVX2 copies of
    the activation blocks (NEPENTHE_CPU_NO_AVX512=1) pass the pattern and activation tests too."""
    env = dict(os.environ, **{switch: "1"})
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.abspath(__file__),
           "-k", "every_pattern and (nchw or linear_c19 or rows_sliced) or special_values or odd_sizes or "
                 "(dense_range and contiguous) or inplace or table"]
    proc = subprocess.run(cmd, cwd=here, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_threads_give_the_same_results_parallel_or_backed_off():
    """At 2 threads each region either splits (thread 0 takes the first chunk, counts merged with atomic
    adds) or, after a region whose threads waited on each other, runs on the calling thread; on a shared
    machine both happen within these calls. Counts must be exact and steps identical every time."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(3, 37, 1901, generator=torch.Generator().manual_seed(5))  # 211k elements: above the grain
        want = torch.zeros(37, 4, dtype=torch.int64)
        reference.sign_histogram_(want, x, 1.0)
        p0, g, mask = torch.randn(100_003), torch.randn(100_003), torch.rand(100_003) > 0.5
        p_want, b_want = p0.clone(), torch.zeros(100_003)
        reference.masked_sgd_([p_want], [g], [b_want], [mask], 0.1, 0.9, 0.0, 1e-4, False, False, False)
        for _ in range(30):
            hist = torch.zeros(37, 4, dtype=torch.int64)
            CPP.sign_histogram_(hist, x, 1.0)
            assert torch.equal(hist, want)
            p, b = p0.clone(), torch.zeros(100_003)
            CPP.masked_sgd_([p], [g], [b], [mask], 0.1, 0.9, 0.0, 1e-4, False, False, False)
            assert torch.equal(p, p_want) and torch.equal(b, b_want)
    finally:
        torch.set_num_threads(before)
