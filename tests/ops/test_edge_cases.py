"""Edge cases on which the backends once disagreed (issue 14 item 7), with one rule for all of them:

* a tensor written in place whose elements share memory (expanded / overlapping views) is refused,
  before dispatch, with the same ValueError on every backend (nepenthe/ops/_args.py); reading such a
  tensor is fine;
* optimizer hyperparameters are range-checked once (torch.optim's ranges, plus finiteness; beta = 1
  refused): a ValueError naming the argument, nothing written;
* φ(±inf) is the limit of φ (reference.activation): GELU(+inf) = +inf, GELU/SiLU/hardswish(-inf) = -0.0,
  leaky_relu(-inf) = -inf·slope (0 for slope 0); NaN stays NaN;
* fp16/bf16 optimizer steps compute in fp32 and round once on store (torch's fused AdamW): a second
  moment that overflows fp16 is stored as inf, but its step is taken.

Every test runs on each backend (torch reference, cpp, triton through the interpreter, cuda), through
the public ops with the backend forced; a backend that cannot run here is skipped with its reason.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from nepenthe import ops
from nepenthe.ops import backends, reference
from nepenthe.testing import tolerance

pytestmark = pytest.mark.usefixtures("one_thread")

INF = math.inf


@pytest.fixture(params=["torch", "cpp", "triton", "cuda"])
def backend(request):
    """(name, device) with the backend forced for the test's duration."""
    name = request.param
    try:
        backends.load(name)
    except backends.BackendUnavailable as exc:
        pytest.skip(str(exc))
    if name == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton without a GPU needs TRITON_INTERPRET=1")
    on_gpu = name == "cuda" or (name == "triton" and torch.cuda.is_available())
    with ops.use_backend(name):
        yield name, torch.device("cuda" if on_gpu else "cpu")


def _hist(c: int, device, bins: int = 4) -> torch.Tensor:
    return torch.zeros(c, bins, dtype=torch.int64, device=device)


# ----- in place on memory shared between elements -----------------------------------------------------
def _expanded(device):
    return torch.tensor([[-1.0, 2.0, 0.0]], device=device).expand(4, 3)


def _overlapping(device):  # rows 0..2 of a 4-wide window sliding by 2: rows share half their elements
    return torch.tensor([-1.0, 2.0, -3.0, 4.0, -5.0, 6.0, 0.5, -0.5], device=device).as_strided((3, 4), (2, 1))


@pytest.mark.parametrize("make", [_expanded, _overlapping], ids=["expanded", "overlapping"])
@pytest.mark.parametrize("kind", ["relu", "leaky_relu", "gelu"])
def test_inplace_on_shared_memory_is_refused(backend, make, kind):
    _, device = backend
    x = make(device)
    before, hist = x.clone(), _hist(x.shape[1], device)
    with pytest.raises(ValueError, match=r"x is written in place but several of its elements share memory.*"
                                         r"x\.clone\(\)"):
        ops.activation_histogram_(x, hist, kind, 1)
    assert torch.equal(x, before) and not hist.any(), "a refused call must write nothing"


@pytest.mark.parametrize("make", [_expanded, _overlapping], ids=["expanded", "overlapping"])
def test_shared_memory_input_is_read_like_a_copy(backend, make):
    """Reading is well defined: the out-of-place ops count an overlapping x like its materialised copy."""
    _, device = backend
    x = make(device)
    want_y, want_h = reference.activation(x.cpu().clone(), "relu"), reference.sign_histogram(x.cpu().clone(), 1)
    assert torch.equal(ops.sign_histogram(x, 1).cpu(), want_h)
    hist = _hist(x.shape[1], device)
    y = ops.accumulate_activation_histogram(x, hist, "relu", 1)
    assert torch.equal(y.cpu(), want_y) and torch.equal(hist.cpu(), want_h)


def test_histogram_buffer_sharing_memory_is_refused(backend):
    _, device = backend
    x = torch.randn(2, 3, device=device)
    hist = torch.zeros(1, 4, dtype=torch.int64, device=device).expand(3, 4)
    with pytest.raises(ValueError, match=r"hist is written in place .* torch\.zeros\(3, 4, dtype=torch\.int64\)"):
        ops.accumulate_sign_histogram_(hist, x, 1)
    with pytest.raises(ValueError, match="hist is written in place"):
        ops.accumulate_activation_histogram(x, hist, "relu", 1)


@pytest.mark.parametrize("layout", ["sliced", "transposed", "interleaved"])
def test_inplace_on_strided_but_disjoint_memory_still_runs(backend, layout):
    """Only shared memory is refused: a non-contiguous view whose elements are distinct runs in place."""
    _, device = backend
    base = torch.randn(64, generator=torch.Generator().manual_seed(3)).to(device)
    x = {"sliced": lambda: base.view(4, 16)[:, ::3],
         "transposed": lambda: base.view(8, 8).t(),
         # offsets {0, 2, 4} + {0, 3}: no stride order proves it disjoint, the exact check does
         "interleaved": lambda: base.as_strided((3, 2), (2, 3))}[layout]()
    want_y, want_h = reference.activation(x.cpu().clone(), "leaky_relu", 0.1), reference.sign_histogram(x.cpu(), 1)
    hist = _hist(x.shape[1], device)
    ops.activation_histogram_(x, hist, "leaky_relu", 1, negative_slope=0.1)
    torch.testing.assert_close(x.cpu(), want_y)
    assert torch.equal(hist.cpu(), want_h)


def test_optimizer_state_sharing_memory_is_refused(backend):
    _, device = backend
    p, g = torch.ones(3, 4, device=device), torch.ones(3, 4, device=device)
    shared = torch.zeros(1, 4, device=device).expand(3, 4)
    with pytest.raises(ValueError, match=r"momentum_buffers\[0\] is written in place .*torch\.zeros_like"):
        ops.masked_sgd_([p], [g], [shared], [None], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"params\[0\] is written in place"):
        ops.masked_sgd_([torch.ones(1, 4, device=device).expand(3, 4)], [g], [], [None], lr=0.1)
    assert torch.equal(p, torch.ones_like(p))


# ----- hyperparameters ------------------------------------------------------------------------------------
def _adamw_state(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {k: [torch.randn(5, 3, generator=g).abs().to(device=device, dtype=dtype)] for k in ("p", "g", "m", "v")}


@pytest.mark.parametrize("name,value", [
    ("beta1", 1.0), ("beta2", 1.0), ("beta1", -0.1), ("beta2", 1.5), ("beta1", math.nan),
    ("lr", math.nan), ("lr", INF), ("lr", -1e-3), ("eps", -1e-8), ("eps", INF), ("weight_decay", math.nan),
    ("weight_decay", -0.1),
])
def test_adamw_hyperparameters_out_of_range_are_refused(backend, name, value):
    _, device = backend
    s = _adamw_state(device)
    before = {k: [t.clone() for t in v] for k, v in s.items()}
    kwargs = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2, name: value}
    with pytest.raises(ValueError, match=rf"masked_adamw_: {name} must be"):
        ops.masked_adamw_(s["p"], s["g"], s["m"], s["v"], [], [None], step=1, **kwargs)
    for k in s:
        assert torch.equal(s[k][0], before[k][0]), f"{k} was written by a refused step"


@pytest.mark.parametrize("kwargs,name", [
    ({"lr": INF}, "lr"), ({"lr": -0.1}, "lr"), ({"momentum": -0.5}, "momentum"), ({"momentum": math.nan}, "momentum"),
    ({"weight_decay": -1e-4}, "weight_decay"), ({"dampening": INF}, "dampening"),
    ({"momentum": 0.9, "dampening": 0.1, "nesterov": True}, "nesterov"),
])
def test_sgd_hyperparameters_out_of_range_are_refused(backend, kwargs, name):
    _, device = backend
    p, g, buf = torch.ones(4, device=device), torch.ones(4, device=device), torch.zeros(4, device=device)
    bufs = [buf] if kwargs.get("momentum", 0) != 0 else []
    with pytest.raises(ValueError, match=rf"masked_sgd_: {name}"):
        ops.masked_sgd_([p], [g], bufs, [None], **{"lr": 0.1, **kwargs})
    assert torch.equal(p, torch.ones_like(p)) and not buf.any()


@pytest.mark.parametrize("beta1,beta2,eps,lr", [
    (0.0, 0.0, 1e-8, 1e-2), (0.9, 0.999, 0.0, 0.0), (0.999999, 0.5, 1.0, 1),
])
def test_adamw_boundary_hyperparameters_agree_with_reference(backend, beta1, beta2, eps, lr):
    _, device = backend
    s = _adamw_state(device)
    want = {k: [t.cpu().clone() for t in v] for k, v in s.items()}
    args = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=1e-2, step=2)
    ops.masked_adamw_(s["p"], s["g"], s["m"], s["v"], [], [None], **args)
    reference.masked_adamw_(want["p"], want["g"], want["m"], want["v"], [], [None], args["lr"], beta1, beta2, eps,
                            1e-2, 2, False, False)
    for k in ("p", "m", "v"):
        torch.testing.assert_close(s[k][0].cpu(), want[k][0])


# ----- activations at ±inf ----------------------------------------------------------------------------
# φ(+inf), φ(-inf), and φ at a large finite negative value, per kind (slope 0.1 for leaky_relu)
LIMITS = {"relu": (INF, 0.0), "relu6": (6.0, 0.0), "leaky_relu": (INF, -INF), "gelu": (INF, -0.0),
          "gelu_tanh": (INF, -0.0), "silu": (INF, -0.0), "hardswish": (INF, -0.0)}


def _same_values(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal as values, NaN where NaN, and zeros with the same sign (every backend writes the same bits)."""
    got, want = got.double().cpu(), want.double().cpu()
    nan = torch.isnan(want)
    return (torch.equal(nan, torch.isnan(got)) and torch.equal(got[~nan], want[~nan])
            and torch.equal(torch.signbit(got[~nan]), torch.signbit(want[~nan])))


def _special(n: int, dtype, device) -> torch.Tensor:
    """n values (n >= 8) with +inf, -inf, NaN, ±0 and large negatives scattered among ordinary ones, so
    that the vector loops (16 lanes) see them as well as the scalar tails."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 3
    picks = torch.randperm(n, generator=g)
    specials = torch.tensor([INF, -INF, math.nan, 0.0, -0.0, -1e4, -INF, INF])
    x[picks[:len(specials)]] = specials
    return x.to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ops.ACTIVATIONS)
def test_activation_at_infinity_is_its_limit(backend, kind, dtype):
    name, device = backend
    n = 40 if name == "triton" and device.type == "cpu" else 4096 + 19
    x = _special(n, dtype, device).view(1, n)
    slope = 0.1
    y, hist = ops.activation_histogram(x, kind, 0, negative_slope=slope, bins=5)
    at_pos, at_neg = LIMITS[kind]
    assert _same_values(y[x == INF], torch.full_like(y[x == INF], at_pos)), f"{kind}(+inf) on {name}"
    assert _same_values(y[x == -INF], torch.full_like(y[x == -INF], at_neg)), f"{kind}(-inf) on {name}"
    assert torch.isnan(y[torch.isnan(x)]).all()
    _agree(y, reference.activation(x.cpu(), kind, slope), x, f"{kind} on {name} against the reference")
    assert hist[:, ops.NONFINITE].sum().item() == 5  # the histogram still counts the input's non-finite values
    x_inplace = x.clone()  # the inplace form takes other loops (the vector GELU is out of place only)
    ops.activation_histogram_(x_inplace, torch.zeros_like(hist[:, :4]), kind, 0, negative_slope=slope)
    _agree(x_inplace, y, x, f"{kind} on {name} in place")


def _agree(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, what: str) -> None:
    """The same bits where x is not finite; elsewhere within the usual per-dtype tolerance of the kernels."""
    special = ~torch.isfinite(x.cpu())
    got, want = got.cpu(), want.cpu()
    assert _same_values(got[special], want[special]), f"{what}: non-finite inputs differ"
    torch.testing.assert_close(got[~special], want[~special], **tolerance(x.dtype), msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("slope,at_neg", [(0.0, 0.0), (-0.5, INF), (0.01, -INF)])
def test_leaky_relu_limit_follows_the_slope(backend, slope, at_neg):
    _, device = backend
    x = torch.tensor([[INF, -INF, -2.0, math.nan]], device=device)
    y, _ = ops.activation_histogram(x, "leaky_relu", 0, negative_slope=slope)
    want = torch.tensor([INF, at_neg, -2.0 * slope, math.nan])
    assert torch.equal(y[0, :3].cpu(), want[:3]) and torch.isnan(y[0, 3]).item()
    assert torch.equal(reference.activation(x.cpu(), "leaky_relu", slope)[0, :3], want[:3])


# ----- low precision: fp32 compute, one rounding on store --------------------------------------------------
def test_fp16_adamw_second_moment_overflow_takes_the_step(backend):
    """g = 300 gives g² = 90000 > fp16's 65504: v is stored as inf, and the step is taken with the fp32
    value (torch's fused AdamW, the same rule); before, the reference divided by inf and skipped it."""
    _, device = backend
    half = dict(dtype=torch.float16, device=device)
    p, g = torch.ones(6, **half), torch.full((6,), 300.0, **half)
    m, v = torch.zeros(6, **half), torch.zeros(6, **half)
    ops.masked_adamw_([p], [g], [m], [v], [], [None], lr=0.1, beta1=0.9, beta2=0.0, eps=1e-8, weight_decay=1e-2,
                      step=1)
    assert torch.isinf(v).all(), "the stored second moment overflows fp16"
    want = torch.nn.Parameter(torch.ones(6, dtype=torch.float16))
    want.grad = torch.full((6,), 300.0, dtype=torch.float16)
    torch.optim.AdamW([want], lr=0.1, betas=(0.9, 0.0), eps=1e-8, weight_decay=1e-2, fused=True).step()
    assert torch.equal(p.cpu(), want.detach()), f"{p} vs torch's fused AdamW {want}"
    assert (p.cpu() < 0.95).all(), "the step must be taken"


def test_fp16_sgd_momentum_overflow_takes_the_step(backend):
    _, device = backend
    half = dict(dtype=torch.float16, device=device)
    p, g, buf = torch.ones(5, **half), torch.full((5,), 60000.0, **half), torch.full((5,), 60000.0, **half)
    ops.masked_sgd_([p], [g], [buf], [None], lr=1e-3, momentum=0.9)  # buf = 0.9·60000 + 60000 = 114000
    assert torch.isinf(buf).all()
    assert torch.equal(p.cpu(), torch.full((5,), 1 - 114.0, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_steps_match_the_reference_within_an_ulp_or_two(backend, dtype):
    """With the same rule (fp32 compute, one rounding) backends agree to the last bit or so of the dtype
    (the Triton interpreter truncates bf16 stores where a GPU rounds them: up to one more ulp)."""
    _, device = backend
    s = _adamw_state(device, dtype)
    want = {k: [t.cpu().clone() for t in v] for k, v in s.items()}
    mask = [torch.rand(5, 3, generator=torch.Generator().manual_seed(1)) > 0.3]
    ops.masked_adamw_(s["p"], s["g"], s["m"], s["v"], [], [mask[0].to(device)], lr=0.05, step=3)
    reference.masked_adamw_(want["p"], want["g"], want["m"], want["v"], [], mask, 0.05, 0.9, 0.999, 1e-8, 1e-2, 3,
                            False, False)
    for k in ("p", "m", "v"):
        # fp32 arithmetic orders may differ by an fp32 ulp, which can flip one fp16/bf16 rounding
        torch.testing.assert_close(s[k][0].cpu(), want[k][0], rtol=2 * torch.finfo(dtype).eps, atol=0)
