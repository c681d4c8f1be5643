"""Every compiled/Triton backend against the PyTorch reference, through the backend contract of
:mod:`nepenthe.ops.backends`: integer counts exactly, floats within per-dtype tolerances.

Each test runs once per backend (cpp, triton, cuda); a backend that cannot run here is skipped with
its reason. Triton runs on the CPU through the interpreter (slow: small shapes only).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from nepenthe import testing
from nepenthe.ops import backends, reference
from nepenthe.ops.reference import ACTIVATIONS
from nepenthe.testing import signed_values, tolerance

DTYPES = list(testing.DTYPES)
ALL_DTYPES = list(testing.ALL_DTYPES)


def _device_for(name: str) -> torch.device:
    if name == "cpp":
        return torch.device("cpu")
    if name == "cuda":
        return torch.device("cuda")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def loaded_backend(name: str):
    """(implementation, device) of backend ``name``, or skip the test saying why it cannot run here."""
    try:
        impl = backends.load(name)
    except backends.BackendUnavailable as exc:
        pytest.skip(str(exc))
    if name == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton without a GPU needs TRITON_INTERPRET=1")
    return impl, _device_for(name)


@pytest.fixture(params=["cpp", "triton", "cuda"])
def backend(request):
    return (request.param, *loaded_backend(request.param))


def _small(name: str) -> bool:
    """The Triton interpreter runs each program instance in Python: keep its shapes small."""
    return name == "triton" and not torch.cuda.is_available()


def _signed_values(shape, dtype, device, *, upper=None, seed=0) -> torch.Tensor:
    """Random values with exact zeros (+0.0 and -0.0) and (when given) exact ties at the upper kink."""
    return signed_values(shape, dtype, device, upper=upper, seed=seed)


def _hist(x3: torch.Tensor, bins: int) -> torch.Tensor:
    return torch.zeros(x3.shape[1], bins, dtype=torch.int64, device=x3.device)


def _reference_hist(x3, upper, bins):
    h = _hist(x3.cpu(), bins)
    reference.sign_histogram_(h, x3.cpu(), upper)
    return h


# ----- layouts the public ops hand to a backend ----------------------------------------------------------
def _layouts(small: bool):
    """(id, x builder(dtype, device), channel_dim): contiguous, channels_last, tokens, odd, sliced, tiny."""
    n, c, h, w = (2, 3, 5, 7) if small else (4, 19, 13, 11)
    return [
        ("nchw", lambda d, dev: _signed_values((n, c, h, w), d, dev, upper=6.0), 1),
        ("channels_last", lambda d, dev: _signed_values((n, c, h, w), d, dev, upper=6.0)
         .to(memory_format=torch.channels_last), 1),
        ("tokens", lambda d, dev: _signed_values((n, 5, c), d, dev, upper=6.0), -1),
        ("linear_2d", lambda d, dev: _signed_values((n * 3, c), d, dev, upper=6.0), 1),
        ("channel_dim0", lambda d, dev: _signed_values((c, n, 3), d, dev, upper=6.0), 0),
        ("sliced", lambda d, dev: _signed_values((n, 2 * c, h, w), d, dev, upper=6.0)[:, ::2, 1:, :-1], 1),
        ("transposed", lambda d, dev: _signed_values((n, h, c), d, dev, upper=6.0).transpose(1, 2), 1),
        ("one_element", lambda d, dev: _signed_values((1, 1, 1, 1), d, dev), 1),
        ("empty_batch", lambda d, dev: _signed_values((0, c, h, w), d, dev), 1),
        ("no_channels", lambda d, dev: _signed_values((n, 0, 3), d, dev), 1),
    ]


LAYOUT_IDS = [lid for lid, _, _ in _layouts(True)]


def _layout(lid: str, small: bool):
    return next((make, dim) for i, make, dim in _layouts(small) if i == lid)


# ----- sign_histogram_ ------------------------------------------------------------------------------------
@pytest.mark.parametrize("lid", LAYOUT_IDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("upper,bins", [(None, 4), (6.0, 5)])
def test_sign_histogram_matches_reference(backend, lid, dtype, upper, bins):
    name, impl, device = backend
    make, dim = _layout(lid, _small(name))
    x3 = reference.as_3d(make(dtype, device), dim)
    hist = _hist(x3, bins)
    impl.sign_histogram_(hist, x3, upper)
    torch.testing.assert_close(hist.cpu(), _reference_hist(x3, upper, bins), rtol=0, atol=0)


def test_sign_histogram_accumulates(backend):
    name, impl, device = backend
    x3 = reference.as_3d(_signed_values((2, 4, 3, 3), torch.float32, device, upper=6.0), 1)
    hist = _hist(x3, 4)
    impl.sign_histogram_(hist, x3, 6.0)
    impl.sign_histogram_(hist, x3, 6.0)
    torch.testing.assert_close(hist.cpu(), 2 * _reference_hist(x3, 6.0, 4), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_sign_histogram_nonfinite(backend, dtype):
    name, impl, device = backend
    x = torch.tensor([[0.0, 1.0, -2.0, math.nan, math.inf, -math.inf, 7.0, 6.0]]).to(dtype).t().contiguous()
    x3 = reference.as_3d(x.to(device), -1)  # 8 observations of one neuron
    hist = _hist(x3, 5)
    impl.sign_histogram_(hist, x3, 6.0)
    # ON: 1, +inf, 7, 6; OFF: -2, -inf; ZERO: 0; SAT: +inf, 7, 6; NONFINITE: nan, ±inf
    assert hist.cpu().tolist() == [[4, 2, 1, 3, 3]]


@pytest.mark.parametrize("shape,dim", [((64, 3, 33, 35), 1), ((37, 1000), 1), ((3, 2, 257), 1), ((1000, 130), 0)])
def test_sign_histogram_larger_shapes(backend, shape, dim):
    name, impl, device = backend
    if _small(name):
        pytest.skip("the Triton interpreter is too slow for large shapes")
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = _signed_values(shape, torch.float32, device, upper=6.0)
        if x.dim() == 4:
            x = x.to(memory_format=memory_format)
        x3 = reference.as_3d(x, dim)
        hist = _hist(x3, 5)
        impl.sign_histogram_(hist, x3, 6.0)
        torch.testing.assert_close(hist.cpu(), _reference_hist(x3, 6.0, 5), rtol=0, atol=0)


@pytest.mark.slow
def test_sign_histogram_64bit_indexing(backend):
    """Over 2^31 elements and over 2^31 counts per channel, without the memory: a stride-0 view."""
    name, impl, device = backend
    if _small(name):
        pytest.skip("the Triton interpreter is too slow for 2^32 elements")
    base = torch.tensor([1.0, -1.0], device=device).view(1, 2, 1, 1)
    x = base.expand(2048, 2, 1024, 1024)  # 2^32 elements, 2^31 per channel
    x3 = reference.as_3d(x, 1)
    hist = _hist(x3, 4)
    impl.sign_histogram_(hist, x3, None)
    assert hist.cpu().tolist() == [[2**31, 0, 0, 0], [0, 2**31, 0, 0]]


# ----- activation_histogram_ ------------------------------------------------------------------------------
def _activation_tolerance(kind: str, x: torch.Tensor, got: torch.Tensor, negative_slope: float) -> None:
    """Low-precision rule (flash-attention's): at most 2x as far from the fp64 truth as PyTorch's own
    result in that dtype, plus a few ulps."""
    truth = reference.activation(x.double(), kind, negative_slope)
    if x.dtype == torch.float64:
        torch.testing.assert_close(got.double(), truth, rtol=1e-12, atol=1e-12)
        return
    torch_err = (reference.activation(x, kind, negative_slope).double() - truth).abs()
    ulp = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}[x.dtype]
    bound = 2 * torch_err + 4 * ulp * truth.abs() + 1e-6
    err = (got.double() - truth).abs()
    if err.numel() == 0:
        return
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"{kind} {x.dtype}: error {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} at "
        f"x={x.flatten()[worst].item()}")


@pytest.mark.parametrize("kind", ACTIVATIONS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("lid", ["nchw", "channels_last", "tokens", "sliced", "one_element", "empty_batch"])
def test_activation_histogram_matches_reference(backend, kind, dtype, lid):
    name, impl, device = backend
    make, dim = _layout(lid, _small(name))
    x = make(dtype, device)
    upper = reference.upper_kink(kind)
    x3 = reference.as_3d(x, dim)
    y = torch.empty_like(x)
    y3 = reference.as_3d(y, dim) if y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last) \
        else torch.empty_like(x3)
    hist = _hist(x3, 5)
    impl.activation_histogram_(x3, y3, hist, ACTIVATIONS.index(kind), 0.2, upper)
    torch.testing.assert_close(hist.cpu(), _reference_hist(x3, upper, 5), rtol=0, atol=0)
    _activation_tolerance(kind, x3.cpu(), y3.cpu(), 0.2)


@pytest.mark.parametrize("kind", ["relu", "relu6", "leaky_relu", "gelu"])
def test_activation_histogram_inplace(backend, kind):
    """y3 may be x3 itself (inplace activations): counts are of the input, the output overwrites it."""
    name, impl, device = backend
    x = _signed_values((2, 3, 4, 5), torch.float32, device, upper=6.0)
    original = x.clone()
    x3 = reference.as_3d(x, 1)
    hist = _hist(x3, 4)
    impl.activation_histogram_(x3, x3, hist, ACTIVATIONS.index(kind), 0.1, reference.upper_kink(kind))
    torch.testing.assert_close(hist.cpu(), _reference_hist(reference.as_3d(original, 1), reference.upper_kink(kind), 4))
    torch.testing.assert_close(x.cpu(), reference.activation(original, kind, 0.1).cpu(), rtol=1e-6, atol=1e-6)


def test_activation_histogram_output_with_other_strides(backend):
    """A channels_last input written to a contiguous output (and the reverse)."""
    name, impl, device = backend
    x = _signed_values((2, 5, 3, 4), torch.float32, device).to(memory_format=torch.channels_last)
    y = torch.empty(x.shape, device=device)
    x3, y3 = reference.as_3d(x, 1), reference.as_3d(y, 1)
    hist = _hist(x3, 4)
    impl.activation_histogram_(x3, y3, hist, ACTIVATIONS.index("relu"), 0.0, None)
    torch.testing.assert_close(y.cpu(), torch.relu(x).cpu(), rtol=0, atol=0)
    torch.testing.assert_close(hist.cpu(), _reference_hist(x3, None, 4), rtol=0, atol=0)


# ----- masked optimizer steps -----------------------------------------------------------------------------
PARAM_SHAPES = [(7, 5), (1,), (0,), (3, 4, 3, 3), (1031,)]


def _param_lists(dtype, device, *, masked=True, seed=0, state_names=("buf",)):
    g = torch.Generator().manual_seed(seed)
    out = {"params": [], "grads": [], "masks": []}
    for key in state_names:
        out[key] = []
    for i, shape in enumerate(PARAM_SHAPES):
        out["params"].append(torch.randn(shape, generator=g).to(dtype=dtype, device=device))
        out["grads"].append(torch.randn(shape, generator=g).to(dtype=dtype, device=device))
        for key in state_names:
            state = torch.randn(shape, generator=g)
            out[key].append((state.abs() if key in ("exp_avg_sq", "max_exp_avg_sq") else state).to(dtype=dtype,
                                                                                               device=device))
        mask = (torch.rand(shape, generator=g) > 0.4).to(device) if masked and i != 1 else None
        out["masks"].append(mask)
    return out


def _clone(lists):
    return {k: [t.clone() if isinstance(t, torch.Tensor) else t for t in v] for k, v in lists.items()}


def _opt_tolerance(dtype):
    tol = tolerance(dtype)
    return tol["rtol"], tol["atol"]


def _assert_masked_zero(tensors, masks):
    for t, m in zip(tensors, masks):
        if m is None:
            continue
        held = t.cpu()[~m.cpu()]
        assert bool((held == 0).all()) and not bool(torch.signbit(held).any()), "masked entries must be exactly +0"


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("momentum,dampening,nesterov,weight_decay,maximize,first_step", [
    (0.0, 0.0, False, 0.0, False, False),
    (0.9, 0.0, False, 5e-4, False, False),
    (0.9, 0.0, True, 1e-2, False, False),
    (0.8, 0.3, False, 0.0, True, False),
    (0.9, 0.0, True, 1e-3, False, True),
])
@pytest.mark.parametrize("masked", [True, False])
def test_masked_sgd_matches_reference(backend, dtype, momentum, dampening, nesterov, weight_decay, maximize,
                                      first_step, masked):
    name, impl, device = backend
    lists = _param_lists(dtype, device, masked=masked)
    expected = _clone(lists)
    bufs = lists["buf"] if momentum else []
    ebufs = expected["buf"] if momentum else []
    args = (0.1, momentum, dampening, weight_decay, nesterov, maximize, first_step)
    reference.masked_sgd_(expected["params"], expected["grads"], ebufs, expected["masks"], *args)
    impl.masked_sgd_(lists["params"], lists["grads"], bufs, lists["masks"], *args)
    rtol, atol = _opt_tolerance(dtype)
    for got, want in zip(lists["params"] + bufs, expected["params"] + ebufs):
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=rtol, atol=atol)
    _assert_masked_zero(lists["params"] + bufs, lists["masks"] * (2 if momentum else 1))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("weight_decay,step,amsgrad,maximize", [
    (0.0, 1, False, False), (1e-2, 1, False, False), (1e-2, 7, True, False), (0.1, 3, False, True),
])
@pytest.mark.parametrize("masked", [True, False])
def test_masked_adamw_matches_reference(backend, dtype, weight_decay, step, amsgrad, maximize, masked):
    name, impl, device = backend
    names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    lists = _param_lists(dtype, device, masked=masked, state_names=names)
    expected = _clone(lists)
    maxes, emaxes = (lists["max_exp_avg_sq"], expected["max_exp_avg_sq"]) if amsgrad else ([], [])
    args = (1e-2, 0.9, 0.999, 1e-8, weight_decay, step, amsgrad, maximize)
    reference.masked_adamw_(expected["params"], expected["grads"], expected["exp_avg"], expected["exp_avg_sq"],
                            emaxes, expected["masks"], *args)
    impl.masked_adamw_(lists["params"], lists["grads"], lists["exp_avg"], lists["exp_avg_sq"], maxes, lists["masks"],
                       *args)
    rtol, atol = _opt_tolerance(dtype)
    got_all = lists["params"] + lists["exp_avg"] + lists["exp_avg_sq"] + maxes
    want_all = expected["params"] + expected["exp_avg"] + expected["exp_avg_sq"] + emaxes
    for got, want in zip(got_all, want_all):
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=rtol, atol=atol)
    _assert_masked_zero(got_all, lists["masks"] * (4 if amsgrad else 3))


def test_masked_sgd_many_parameters_one_call(backend):
    """A multi-tensor call over many parameters of mixed sizes equals one call per parameter."""
    name, impl, device = backend
    g = torch.Generator().manual_seed(3)
    count = 20 if _small(name) else 300
    shapes = [(int(torch.randint(1, 50, (1,), generator=g)),) for _ in range(count)]
    params = [torch.randn(s, generator=g).to(device) for s in shapes]
    grads = [torch.randn(s, generator=g).to(device) for s in shapes]
    bufs = [torch.randn(s, generator=g).to(device) for s in shapes]
    masks = [(torch.rand(s, generator=g) > 0.5).to(device) for s in shapes]
    one = [[t.clone() for t in ts] for ts in (params, grads, bufs)]
    impl.masked_sgd_(params, grads, bufs, masks, 0.05, 0.9, 0.0, 1e-4, False, False, False)
    for i in range(count):
        impl.masked_sgd_([one[0][i]], [one[1][i]], [one[2][i]], [masks[i]], 0.05, 0.9, 0.0, 1e-4, False, False, False)
    for a, b in zip(params + bufs, one[0] + one[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# Sizes around the SIMD widths of the cpp kernels (8 lanes AVX2, 16 AVX-512): tail only, exact
# vectors, vectors plus a padded tail.
TAIL_SHAPES = [(1,), (7,), (8,), (9,), (15,), (16,), (17,), (33,), (3, 5, 7)]


def _tail_lists(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {k: [] for k in ("params", "grads", "buf", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "masks")}
    for shape in TAIL_SHAPES:
        for key in ("params", "grads", "buf", "exp_avg"):
            out[key].append(torch.randn(shape, generator=g).to(dtype=dtype, device=device))
        for key in ("exp_avg_sq", "max_exp_avg_sq"):
            out[key].append(torch.rand(shape, generator=g).to(dtype=dtype, device=device))
        out["masks"].append((torch.rand(shape, generator=g) > 0.5).to(device))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("variant", ["plain", "nesterov_maximize", "amsgrad"])
def test_masked_steps_vector_tails(backend, dtype, weight_decay, variant):
    """SGD and AdamW on sizes around the vector widths, fp32 and bf16, with and without weight decay."""
    name, impl, device = backend
    lists = _tail_lists(dtype, device)
    expected = _clone(lists)
    nesterov = maximize = variant == "nesterov_maximize"
    amsgrad = variant == "amsgrad"
    sgd_args = (0.1, 0.9, 0.0, weight_decay, nesterov, maximize, False)
    reference.masked_sgd_(expected["params"], expected["grads"], expected["buf"], expected["masks"], *sgd_args)
    impl.masked_sgd_(lists["params"], lists["grads"], lists["buf"], lists["masks"], *sgd_args)
    maxes, emaxes = (lists["max_exp_avg_sq"], expected["max_exp_avg_sq"]) if amsgrad else ([], [])
    adam_args = (1e-2, 0.9, 0.999, 1e-8, weight_decay, 4, amsgrad, maximize)
    reference.masked_adamw_(expected["params"], expected["grads"], expected["exp_avg"], expected["exp_avg_sq"],
                            emaxes, expected["masks"], *adam_args)
    impl.masked_adamw_(lists["params"], lists["grads"], lists["exp_avg"], lists["exp_avg_sq"], maxes,
                       lists["masks"], *adam_args)
    rtol, atol = _opt_tolerance(dtype)
    keys = ["params", "buf", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    for key in keys:
        for got, want in zip(lists[key], expected[key]):
            torch.testing.assert_close(got.cpu(), want.cpu(), rtol=rtol, atol=atol)
        _assert_masked_zero(lists[key], lists["masks"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_steps_do_not_depend_on_where_a_piece_starts(dtype):
    """The cpp kernels give each element the same arithmetic in a full vector and in the padded tail:
    a tensor stepped whole equals its two halves stepped as separate tensors, bit for bit."""
    try:
        impl = backends.load("cpp")
    except backends.BackendUnavailable as exc:
        pytest.skip(str(exc))
    g = torch.Generator().manual_seed(5)
    n, cut = 1031, 517
    p, gr, m = (torch.randn(n, generator=g).to(dtype) for _ in range(3))
    v, keep = torch.rand(n, generator=g).to(dtype), torch.rand(n, generator=g) > 0.3
    whole = [t.clone() for t in (p, m, v)]
    halves = [t.clone() for t in (p, m, v)]
    split = [list(t.split([cut, n - cut])) for t in halves]
    gs, ks = list(gr.split([cut, n - cut])), list(keep.split([cut, n - cut]))
    impl.masked_sgd_([whole[0]], [gr], [whole[1]], [keep], 0.1, 0.9, 0.0, 1e-3, True, False, False)
    impl.masked_sgd_(split[0], gs, split[1], ks, 0.1, 0.9, 0.0, 1e-3, True, False, False)
    adam = (1e-2, 0.9, 0.999, 1e-8, 1e-2, 3, False, False)
    impl.masked_adamw_([whole[0]], [gr], [whole[1]], [whole[2]], [], [keep], *adam)
    impl.masked_adamw_(split[0], gs, split[1], split[2], [], ks, *adam)
    for a, b in zip(whole, halves):
        assert torch.equal(a.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           b.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype, torch.int16))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_packed_masks_step_exactly_like_bool_masks(backend, dtype):
    """The public masked steps with bit-packed masks give bit-identical parameters and state to the same
    steps with bool masks, on every backend (those without a packed kernel get them unpacked), over
    the tail sizes and a tensor long enough for several threads' pieces."""
    from nepenthe import ops
    name, impl, device = backend
    lists = _tail_lists(dtype, device, seed=2)
    if not _small(name):
        g = torch.Generator().manual_seed(9)
        for key in ("params", "grads", "buf", "exp_avg"):
            lists[key].append(torch.randn(70001, generator=g).to(dtype=dtype, device=device))
        for key in ("exp_avg_sq", "max_exp_avg_sq"):
            lists[key].append(torch.rand(70001, generator=g).to(dtype=dtype, device=device))
        lists["masks"].append((torch.rand(70001, generator=g) > 0.5).to(device))
    lists["masks"][1] = None  # an unmasked parameter among packed ones
    packed = _clone(lists)
    packed["masks"] = [None if m is None else ops.pack_mask(m) for m in lists["masks"]]
    with backends.use_backend(name):
        for run in (lists, packed):
            ops.masked_sgd_(run["params"], run["grads"], run["buf"], run["masks"], lr=0.1, momentum=0.9,
                            weight_decay=1e-2, nesterov=True)
            ops.masked_adamw_(run["params"], run["grads"], run["exp_avg"], run["exp_avg_sq"], run["max_exp_avg_sq"],
                              run["masks"], lr=1e-2, weight_decay=1e-2, step=3, amsgrad=True)
    for key in ("params", "buf", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        for a, b in zip(lists[key], packed[key]):
            assert torch.equal(_bits(a.cpu()), _bits(b.cpu())), key
        _assert_masked_zero(packed[key], lists["masks"])


def test_packed_mask_of_the_wrong_length_is_refused():
    from nepenthe import ops
    p, g = torch.zeros(20), torch.zeros(20)
    message = r"mask 0 must be a bool tensor of shape \(20,\) or a packed one.*uint8\[3\]"
    for shape in ((2,), (3, 1), (20,)):
        bad = torch.zeros(shape, dtype=torch.uint8)
        with pytest.raises(ValueError, match=message):
            with backends.use_backend("torch"):
                ops.masked_sgd_([p], [g], [], [bad], lr=0.1)
    try:
        impl = backends.load("cpp")
    except backends.BackendUnavailable:
        return
    with pytest.raises(RuntimeError, match=r"masks\[0\] is uint8 of shape \[2\]; a packed mask of params\[0\] "
                                            r"\(20 elements\) must be 1-d with 3 bytes"):
        impl.masked_sgd_([p], [g], [], [torch.zeros(2, dtype=torch.uint8)], 0.1, 0.0, 0.0, 0.0, False, False, False)


_ISA_CHECK = """
import torch
from nepenthe.ops import backends, pack_mask, reference
impl = backends.load("cpp")
g = torch.Generator().manual_seed(1)
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
    for wd in (0.0, 1e-2):
        for n in (1, 7, 9, 16, 17, 40, 1031):
            p, gr, b, m = (torch.randn(n, generator=g).to(dtype) for _ in range(4))
            v, x = (torch.rand(n, generator=g).to(dtype) for _ in range(2))
            keep = torch.rand(n, generator=g) > 0.5
            ours, ref, bits = [[t.clone() for t in (p, b, m, v, x)] for _ in range(3)]
            for fn, s, k in ((impl, ours, keep), (reference, ref, keep), (impl, bits, pack_mask(keep))):
                fn.masked_sgd_([s[0]], [gr], [s[1]], [k], 0.1, 0.9, 0.0, wd, True, True, False)
                fn.masked_adamw_([s[0]], [gr], [s[2]], [s[3]], [s[4]], [k], 1e-2, 0.9, 0.999, 1e-8, wd, 2, True,
                                 False)
            for a, r, c in zip(ours, ref, bits):
                torch.testing.assert_close(a, r, rtol=tol, atol=tol)
                assert torch.equal(a, c)  # packed masks: the same arithmetic, bit for bit
                assert bool((a[~keep] == 0).all()) and not bool(torch.signbit(a[~keep]).any())
print("ok")
"""


@pytest.mark.parametrize("env", ["NEPENTHE_CPU_NO_AVX512", "NEPENTHE_CPU_BASELINE"])
def test_masked_steps_on_every_cpu_code_path(env):
    """The AVX2 kernels (on an AVX-512 machine) and the portable loops (on any x86-64), as a CPU without
    those instruction sets would run them: the switches are read once per process, hence a subprocess."""
    try:
        backends.load("cpp")
    except backends.BackendUnavailable as exc:
        pytest.skip(str(exc))
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _ISA_CHECK], capture_output=True, text=True, timeout=300,
                         env={**os.environ, env: "1"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
