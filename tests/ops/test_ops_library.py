"""The public custom ops (torch.ops.nepenthe.*): opcheck, torch.compile, autograd, argument errors,
backend selection and fallback, and the drop-in masked optimizers against torch.optim."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
from torch.library import opcheck

from nepenthe import ops
from nepenthe.ops import backends, reference

HERE_BACKENDS = [name for name in ("torch", "cpp") if backends.available_backends()[name] is None]


@pytest.fixture(params=HERE_BACKENDS)
def cpu_backend(request):
    with ops.use_backend(request.param):
        yield request.param


def _x(shape=(3, 4, 5, 2), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) * 4
    x[x.abs() < 0.5] = 0.0
    return x


# ----- opcheck (schema, fake tensors, autograd registration, aliasing) -------------------------------
def test_opcheck_histogram_ops(cpu_backend):
    x = _x()
    opcheck(torch.ops.nepenthe.sign_histogram.default, (x, 1, 6.0, 5))
    opcheck(torch.ops.nepenthe.sign_histogram.default, (x.to(memory_format=torch.channels_last), 1, None, 4))
    opcheck(torch.ops.nepenthe.accumulate_sign_histogram_.default,
            (torch.zeros(4, 4, dtype=torch.int64), x, 1, None))
    opcheck(torch.ops.nepenthe.entropy_from_histogram.default, (ops.sign_histogram(x), "exclude", "mean"))


@pytest.mark.parametrize("kind", ops.ACTIVATIONS)
def test_opcheck_activation_ops(cpu_backend, kind):
    x = _x(dtype=torch.float64).requires_grad_()
    opcheck(torch.ops.nepenthe.activation_histogram.default, (x, kind, 1, 0.1, 4))
    opcheck(torch.ops.nepenthe.activation_histogram_.default,
            (_x(), torch.zeros(4, 5, dtype=torch.int64), kind, 1, 0.1))


def test_opcheck_optimizer_ops(cpu_backend):
    params = [torch.randn(5, 3), torch.randn(7)]
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.randn_like(p) for p in params]
    masks = [torch.rand(5, 3) > 0.5, None]
    opcheck(torch.ops.nepenthe.masked_sgd_.default,
            (params, grads, bufs, masks, 0.1, 0.9, 0.0, 1e-4, True, False, False))
    moments = [[torch.rand_like(p) for p in params] for _ in range(3)]
    opcheck(torch.ops.nepenthe.masked_adamw_.default,
            (params, grads, *moments, masks, 1e-3, 0.9, 0.999, 1e-8, 1e-2, 3, True, False))


# ----- torch.compile(fullgraph=True) ---------------------------------------------------------------------
def test_ops_compile_fullgraph(cpu_backend):
    torch._dynamo.reset()

    def fn(x, hist):
        y, h = ops.activation_histogram(x, "relu6", 1, bins=5)
        ops.accumulate_sign_histogram_(hist, y, 1)
        neuron, layer = ops.entropy_from_histogram(h)
        return y * 2, h, neuron, layer, ops.sign_histogram(x, -1)

    x = _x()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    h_compiled, h_eager = torch.zeros(4, 4, dtype=torch.int64), torch.zeros(4, 4, dtype=torch.int64)
    for got, want in zip(compiled(x, h_compiled), fn(x, h_eager)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(h_compiled, h_eager, rtol=0, atol=0)


def test_compiled_training_step_with_fused_activation(cpu_backend):
    torch._dynamo.reset()
    lin = nn.Linear(6, 8)

    def step(x):
        y, hist = ops.activation_histogram(lin(x), "gelu", -1)
        return y.square().mean(), hist

    x = torch.randn(10, 6)
    loss, hist = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    loss.backward()
    grad_compiled = lin.weight.grad.clone()
    lin.weight.grad = None
    torch.nn.functional.gelu(lin(x)).square().mean().backward()
    torch.testing.assert_close(grad_compiled, lin.weight.grad)
    torch.testing.assert_close(hist, ops.sign_histogram(lin(x).detach(), -1), rtol=0, atol=0)


# ----- public ops against the reference ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ops.ACTIVATIONS)
def test_activation_histogram_values_and_gradient(cpu_backend, kind):
    x = _x(dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    y, hist = ops.activation_histogram(x, kind, 1, negative_slope=0.2)
    want = reference.activation(x.detach(), kind, 0.2)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(hist, reference.sign_histogram(x, 1, reference.upper_kink(kind)), rtol=0, atol=0)
    # nonzero inputs only away from kinks, so finite differences are valid
    xs = (torch.rand(4, 3, dtype=torch.float64) * 2 + 0.2) * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    torch.autograd.gradcheck(lambda t: ops.activation_histogram(t, kind, -1, negative_slope=0.2)[0],
                             (xs.requires_grad_(),))


def test_inplace_activation_histogram(cpu_backend):
    x = _x()
    original = x.clone()
    hist = torch.zeros(4, 4, dtype=torch.int64)
    out = ops.activation_histogram_(x, hist, "leaky_relu", negative_slope=0.3)
    assert out is x
    torch.testing.assert_close(x, torch.nn.functional.leaky_relu(original, 0.3))
    torch.testing.assert_close(hist, reference.sign_histogram(original, 1), rtol=0, atol=0)


def test_activation_on_unviewable_strides(cpu_backend):
    """A permuted tensor whose batch dims cannot merge into one: written through a temporary."""
    base = _x((4, 5, 3, 2))
    x = base.permute(2, 1, 0, 3)  # shape (3, 5, 4, 2), channel dim 1 (size 5)
    y, hist = ops.activation_histogram(x, "relu", 1)
    torch.testing.assert_close(y, torch.relu(x), rtol=0, atol=0)
    torch.testing.assert_close(hist, reference.sign_histogram(x, 1), rtol=0, atol=0)
    x2 = x.clone()
    h2 = torch.zeros(5, 4, dtype=torch.int64)
    ops.activation_histogram_(x2.permute(0, 1, 2, 3), h2, "relu", 1)
    torch.testing.assert_close(h2, hist, rtol=0, atol=0)


def test_accumulate_into_noncontiguous_buffer(cpu_backend):
    x = _x()
    big = torch.zeros(4, 10, dtype=torch.int64)
    view = big[:, ::2]  # [4, 5], strided
    ops.accumulate_sign_histogram_(view, x, 1, 6.0)
    torch.testing.assert_close(view, reference.sign_histogram(x, 1, 6.0, bins=5), rtol=0, atol=0)


def test_integer_input_histogram_uses_reference():
    x = torch.tensor([[1, -2, 0], [3, 0, 0]])
    assert ops.sign_histogram(x, 0).tolist() == [[1, 1, 1, 0], [1, 0, 2, 0]]


@pytest.mark.parametrize("call,match", [
    (lambda: ops.sign_histogram(torch.tensor(1.0)), "scalar"),
    (lambda: ops.sign_histogram(torch.randn(2, 3), 2), "channel_dim=2 is out of range"),
    (lambda: ops.sign_histogram(torch.randn(2, 3), bins=3), "bins must be 4"),
    (lambda: ops.sign_histogram(torch.randn(2, 3, dtype=torch.complex64)), "real-valued"),
    (lambda: ops.accumulate_sign_histogram_(torch.zeros(4, 4, dtype=torch.int64), torch.randn(2, 3)), r"int64\[3, 4\]"),
    (lambda: ops.accumulate_sign_histogram_(torch.zeros(3, 4, dtype=torch.int32), torch.randn(2, 3)), "int64"),
    (lambda: ops.activation_histogram(torch.randn(2, 3), "tanh"), "unknown activation 'tanh'"),
    (lambda: ops.activation_histogram(torch.ones(2, 3, dtype=torch.int64)), "floating-point"),
    (lambda: ops.entropy_from_histogram(torch.zeros(3, 4, dtype=torch.int64), zero_as="x"), "zero_as"),
    (lambda: ops.entropy_from_histogram(torch.zeros(3, 2, dtype=torch.int64)), r"\[C, 4\]"),
    (lambda: ops.masked_sgd_([torch.zeros(3)], [], [], [None], lr=0.1), "grads has 0 tensors for 1"),
    (lambda: ops.masked_sgd_([torch.zeros(3)], [torch.zeros(3)], [], [torch.ones(3)], lr=0.1), "bool tensor"),
    (lambda: ops.masked_sgd_([torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], [None], lr=0.1), "empty"),
    (lambda: ops.masked_adamw_([torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(2)], [], [None],
                               lr=0.1, step=1), r"exp_avg_sqs\[0\] has shape \(2,\)"),
    (lambda: ops.masked_adamw_([torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], [], [None],
                               lr=0.1, step=0), "step must be >= 1"),
])
def test_bad_arguments_are_refused_with_a_clear_message(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----- backend selection ---------------------------------------------------------------------------------
def test_unknown_backend_names_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with ops.use_backend("fast"):
            pass
    monkeypatch.setenv("NEPENTHE_BACKEND", "gpu")
    with pytest.raises(ValueError, match="NEPENTHE_BACKEND='gpu'"):
        ops.sign_histogram(torch.randn(2, 3))


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    with ops.use_backend("cuda"):
        with pytest.raises(ops.BackendUnavailable, match="cuda"):
            ops.sign_histogram(torch.randn(2, 3))
    if backends.available_backends()["cpp"] is None:
        monkeypatch.setenv("NEPENTHE_BACKEND", "cpp")
        with pytest.raises(ops.BackendUnavailable, match="no kernel for"):
            ops.sign_histogram(torch.tensor([[1, 2]]))


def test_environment_variable_selects_the_backend(monkeypatch):
    calls = []
    monkeypatch.setattr(reference, "sign_histogram_", lambda *a: calls.append(a) or None)
    monkeypatch.setenv("NEPENTHE_BACKEND", "torch")
    ops.sign_histogram(torch.randn(2, 3))
    assert len(calls) == 1
    with ops.use_backend(None):  # the context manager's explicit None still defers to the variable
        ops.sign_histogram(torch.randn(2, 3))
    assert len(calls) == 2


def test_automatic_choice_falls_back_with_one_warning(monkeypatch):
    def broken():
        raise ImportError("simulated broken nepenthe._C")
    monkeypatch.setitem(backends.TABLE, "cpp", dataclasses.replace(backends.TABLE["cpp"], loader=broken))
    backends.reset_cache()
    try:
        x = _x()
        with pytest.warns(RuntimeWarning, match="simulated broken nepenthe._C"):
            got = ops.sign_histogram(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # only the first fallback warns
            ops.sign_histogram(x)
        torch.testing.assert_close(got, reference.sign_histogram(x), rtol=0, atol=0)
        with ops.use_backend("cpp"), pytest.raises(ops.BackendUnavailable, match="simulated broken"):
            ops.sign_histogram(x)
    finally:
        backends.reset_cache()


def test_cuda_version_mismatch_says_how_to_fix(monkeypatch):
    import types

    fake = types.SimpleNamespace(cuda_version=lambda: 12040)
    monkeypatch.setattr(backends, "_load_extension", lambda: fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(ImportError, match=r"built with CUDA 12\.4 but torch uses CUDA 13\.0.*rebuild"):
        backends._load_cuda()
    fake.cuda_version = lambda: 0
    with pytest.raises(ImportError, match="built without CUDA"):
        backends._load_cuda()


def test_import_survives_a_missing_extension():
    code = ("import sys; sys.modules['nepenthe._C'] = None\n"
            "import warnings, torch, nepenthe\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    h = nepenthe.ops.sign_histogram(torch.tensor([[1.0, -1.0, 0.0]]).t(), 0)\n"
            "print(h.tolist(), any('falling back' in str(x.message) for x in w))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]] True"


# ----- drop-in masked optimizers -----------------------------------------------------------------------------
def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 4))


def _masks(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {p: torch.rand(p.shape, generator=g) > 0.3 for p in model.parameters() if p.dim() > 1}


def _train_steps(model, optimizer, steps=5, masks=None):
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 4, generator=g)
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()
        if masks is not None:  # what the unfused way needs after each step
            with torch.no_grad():
                for p, m in masks.items():
                    ops.apply_mask_(p, m, optimizer.state.get(p))


@pytest.mark.parametrize("kwargs", [dict(lr=0.1), dict(lr=0.05, momentum=0.9, weight_decay=1e-3),
                                    dict(lr=0.05, momentum=0.9, nesterov=True),
                                    dict(lr=0.05, momentum=0.8, dampening=0.2, maximize=True)])
@pytest.mark.parametrize("pack_masks", [False, True])
def test_masked_sgd_equals_torch_sgd_then_mask(cpu_backend, kwargs, pack_masks):
    ours, theirs = _net(), _net()
    ours_masks, their_masks = _masks(ours), _masks(theirs)
    _train_steps(ours, ops.MaskedSGD(ours.parameters(), masks=ours_masks, pack_masks=pack_masks, **kwargs))
    _train_steps(theirs, torch.optim.SGD(theirs.parameters(), **kwargs), masks=their_masks)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, m in ours_masks.items():
        assert bool((p[~m] == 0).all())


@pytest.mark.parametrize("kwargs", [dict(lr=1e-2), dict(lr=1e-2, weight_decay=0.1, amsgrad=True),
                                    dict(lr=1e-2, betas=(0.8, 0.99), maximize=True)])
@pytest.mark.parametrize("pack_masks", [False, True])
def test_masked_adamw_equals_torch_adamw_then_mask(cpu_backend, kwargs, pack_masks):
    ours, theirs = _net(), _net()
    ours_masks, their_masks = _masks(ours), _masks(theirs)
    opt = ops.MaskedAdamW(ours.parameters(), masks=ours_masks, pack_masks=pack_masks, **kwargs)
    _train_steps(ours, opt)
    _train_steps(theirs, torch.optim.AdamW(theirs.parameters(), foreach=False, **kwargs), masks=their_masks)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, m in ours_masks.items():
        state = opt.state[p]
        for t in (p, state["exp_avg"], state["exp_avg_sq"]):
            assert bool((t[~m] == 0).all())


def test_masked_optimizers_state_dicts_are_torch_compatible():
    model = _net()
    sgd = ops.MaskedSGD(model.parameters(), lr=0.1, momentum=0.9)
    _train_steps(model, sgd, steps=2)
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plain.load_state_dict(sgd.state_dict())
    again = ops.MaskedSGD(model.parameters(), lr=0.1, momentum=0.9)
    again.load_state_dict(plain.state_dict())
    for p in model.parameters():
        torch.testing.assert_close(again.state[p]["momentum_buffer"], sgd.state[p]["momentum_buffer"])
    adam = ops.MaskedAdamW(model.parameters(), lr=1e-3)
    _train_steps(model, adam, steps=3)
    plain_adam = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plain_adam.load_state_dict(adam.state_dict())
    assert all(int(plain_adam.state[p]["step"]) == 3 for p in model.parameters())


def test_masked_optimizer_follows_masks_replaced_between_steps_and_schedulers():
    from nepenthe import masks as mask_api
    from nepenthe.loop import masked_training

    model = _net()
    opt = masked_training.masked_optimizer(model, "sgd", lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train_steps(model, opt, steps=1)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    first = model[0]
    mask = torch.zeros_like(first.weight, dtype=torch.bool)
    mask[:, 0] = True
    mask_api.set_mask(first, mask)  # a new pruning round replaces the mask buffer
    _train_steps(model, opt, steps=2)
    assert bool((first.weight[:, 1:] == 0).all()) and bool((first.weight[:, 0] != 0).all())
    assert bool((opt.state[first.weight]["momentum_buffer"][:, 1:] == 0).all())


def test_masked_optimizer_argument_checks():
    p = nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ValueError, match="Nesterov"):
        ops.MaskedSGD([p], lr=0.1, nesterov=True)
    opt = ops.MaskedSGD([p], lr=0.1, masks={p: torch.ones(2, 3, dtype=torch.bool)})
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 3\) does not fit"):
        opt.step()
    q = nn.Parameter(torch.randn(3))
    q.grad = None  # parameters without a gradient are skipped, like torch.optim does
    ops.MaskedAdamW([q], lr=0.1).step()


# ----- the eager CPU path of the optimizers (straight to the cpp kernel) -----------------------------------
def _cpp_or_skip():
    try:
        backends.load("cpp")
    except backends.BackendUnavailable as exc:
        pytest.skip(str(exc))


def test_masked_steps_bump_version_counters_on_the_eager_path():
    """Like torch's own in-place ops, a step bumps the versions of everything it writes (autograd
    then refuses a backward through a tensor saved before the step)."""
    _cpp_or_skip()
    model = _net()
    for opt in (ops.MaskedSGD(model.parameters(), lr=0.1, momentum=0.9), ops.MaskedAdamW(model.parameters(), lr=1e-2)):
        _train_steps(model, opt, steps=1)
        before = [p._version for p in model.parameters()]
        state_before = [[t._version for t in opt.state[p].values() if t.dim() > 0] for p in model.parameters()]
        _train_steps(model, opt, steps=1)
        assert all(p._version > b for p, b in zip(model.parameters(), before))
        for p, vs in zip(model.parameters(), state_before):
            assert all(t._version > b for t, b in zip([t for t in opt.state[p].values() if t.dim() > 0], vs))


def test_masked_steps_eager_path_hands_odd_calls_to_the_full_path():
    """What the kernel rejects (a non-contiguous mask, a float mask, mismatched lists) is redone on the
    full path: the odd tensors step through the reference, bad arguments raise the Python errors."""
    _cpp_or_skip()
    torch.manual_seed(0)
    p = torch.randn(6, 6)
    g = torch.randn(6, 6)
    keep = (torch.rand(6, 6) > 0.5).t()  # not contiguous
    ours, theirs = p.clone(), p.clone()
    with torch.no_grad(), ops.use_backend("cpp"):
        ops.masked_sgd_([ours], [g], [torch.zeros(6, 6)], [keep], lr=0.1, momentum=0.9, weight_decay=1e-2)
    reference.masked_sgd_([theirs], [g], [torch.zeros(6, 6)], [keep], 0.1, 0.9, 0.0, 1e-2, False, False, False)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    p0 = p.clone()
    with torch.no_grad(), pytest.raises(ValueError, match="bool tensor"):
        ops.masked_sgd_([p], [g], [], [torch.ones(6, 6)], lr=0.1)
    with torch.no_grad(), pytest.raises(ValueError, match="grads has 0 tensors"):
        ops.masked_adamw_([p], [], [torch.zeros(6, 6)], [torch.zeros(6, 6)], [], [None], lr=0.1, step=1)
    assert torch.equal(p, p0)  # nothing written by a rejected call


def test_masked_adamw_steps_count_per_parameter():
    """Step counts are incremented together (one foreach add) but still group parameters by count."""
    model = _net()
    params = list(model.parameters())
    opt = ops.MaskedAdamW(params, lr=1e-2)
    _train_steps(model, opt, steps=2)
    params[0].grad = None  # the first parameter skips a step
    for p in params[1:]:
        p.grad = torch.randn_like(p)
    opt.step()
    assert [int(opt.state[p]["step"]) for p in params] == [2] + [3] * (len(params) - 1)
    assert all(opt.state[p]["step"].dtype == torch.float32 for p in params)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("pack_masks", [False, True])
def test_masked_optimizers_see_masks_edited_in_place(cpu_backend, mask_dtype, pack_masks):
    """Masks are looked up every step; an in-place edit (a pruning round growing the mask) is applied
    at the next step, also for a mask that needs converting to bool, and to a packed copy."""
    model = _net()
    masks = {p: torch.ones(p.shape, dtype=mask_dtype) for p in model.parameters() if p.dim() > 1}
    for opt in (ops.MaskedSGD(model.parameters(), lr=0.1, momentum=0.9, masks=masks, pack_masks=pack_masks),
                ops.MaskedAdamW(model.parameters(), lr=1e-2, masks=masks, pack_masks=pack_masks)):
        for m in masks.values():
            m.fill_(1)
        _train_steps(model, opt, steps=1)
        for m in masks.values():
            m[0, :2] = 0
        _train_steps(model, opt, steps=1)
        for p, m in masks.items():
            assert bool((p[0, :2] == 0).all()) and bool((p[m.bool()] != 0).all())


def test_packed_masks_are_packed_once_per_mask_change(cpu_backend, monkeypatch):
    """With pack_masks=True a mask is packed at its first step and again only after it changed (in
    place or replaced), not at every step."""
    from nepenthe.ops import optim as optim_module

    calls = []
    real = optim_module.pack_mask
    monkeypatch.setattr(optim_module, "pack_mask", lambda m: calls.append(1) or real(m))
    model = _net()
    masks = _masks(model)
    opt = ops.MaskedSGD(model.parameters(), lr=0.1, momentum=0.9, masks=masks, pack_masks=True)
    _train_steps(model, opt, steps=3)
    assert len(calls) == len(masks)
    first = next(iter(masks))
    masks[first][0] = False  # in place: its version counter moves
    _train_steps(model, opt, steps=2)
    assert len(calls) == len(masks) + 1 and bool((first[0] == 0).all())
