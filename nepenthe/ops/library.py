"""The public fused ops as ``torch.library`` custom ops in the ``nepenthe::`` namespace.

Each op validates its arguments (errors name the tensor and say what to pass), lays the tensors out
as the backend contract of :mod:`nepenthe.ops.backends` requires, picks the backend for the call
and runs it. Every op has a fake (meta) implementation, so it passes ``torch.library.opcheck`` and
stays a single opaque node under ``torch.compile(fullgraph=True)``; the backend is chosen when the
op runs, never baked into a compiled graph.

Ops (``torch.ops.nepenthe.*``):

* ``sign_histogram(x, channel_dim, upper, bins) -> int64[C, bins]``
* ``accumulate_sign_histogram_(hist, x, channel_dim, upper)`` (adds into ``hist``)
* ``activation_histogram(x, kind, channel_dim, negative_slope, bins) -> (y, hist)``, differentiable
  in ``x`` (the backward is ATen's own activation backward)
* ``activation_histogram_(x, hist, kind, channel_dim, negative_slope)``: inplace activation that
  adds the counts of its input into ``hist``
* ``entropy_from_histogram(hist, zero_as, aggregate) -> (float64[C], float64 scalar)``
* ``masked_sgd_(...)`` and ``masked_adamw_(...)``: multi-tensor masked optimizer steps
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import reference
from .backends import KERNEL_DTYPES, select
from .reference import ACTIVATIONS, AGGREGATES, HISTOGRAM_BINS, ZERO_AS, as_3d, view_3d

# ----- argument checks ----------------------------------------------------------------------------------


def _check_input(x: Tensor, channel_dim: int, what: str) -> int:
    """The number of channels of ``x``; ValueError naming ``what`` when ``x`` cannot be counted."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: expected a tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{what}: needs a tensor with at least one dimension (the neurons), got a scalar")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{what}: sign states need a real-valued tensor, got {x.dtype}")
    if not -x.dim() <= channel_dim < x.dim():
        raise ValueError(f"{what}: channel_dim={channel_dim} is out of range for a {x.dim()}-d tensor of shape "
                         f"{tuple(x.shape)}")
    return x.shape[channel_dim]


def _check_hist(hist: Tensor, channels: int, device: torch.device, what: str) -> None:
    if (not isinstance(hist, Tensor) or hist.dtype != torch.int64 or hist.dim() != 2
            or hist.shape[0] != channels or hist.shape[1] not in HISTOGRAM_BINS):
        got = f"{hist.dtype}{list(hist.shape)}" if isinstance(hist, Tensor) else type(hist).__name__
        raise ValueError(f"{what}: the histogram buffer must be int64[{channels}, 4] (ON, OFF, ZERO, SAT) or "
                         f"int64[{channels}, 5] (+ NONFINITE) for an input with {channels} channels, got {got}")
    if hist.device != device:
        raise ValueError(f"{what}: the histogram is on {hist.device} but the input on {device}; keep them together")


def _check_bins(bins: int, what: str) -> None:
    if bins not in HISTOGRAM_BINS:
        raise ValueError(f"{what}: bins must be 4 (ON, OFF, ZERO, SAT) or 5 (+ NONFINITE), got {bins}")


def _check_kind(kind: str, what: str) -> None:
    if kind not in ACTIVATIONS:
        raise ValueError(f"{what}: unknown activation {kind!r}; fused activations are {ACTIVATIONS}")


def _check_activation_input(x: Tensor, what: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{what}: activations need a floating-point tensor, got {x.dtype}")


def _contiguous_hist(hist: Tensor) -> tuple[Tensor, bool]:
    """(buffer a backend may write, whether it is a temporary to add back into ``hist``)."""
    return (hist, False) if hist.is_contiguous() else (torch.zeros_like(hist, memory_format=torch.contiguous_format),
                                                       True)


# ----- sign histograms ----------------------------------------------------------------------------------


@custom_op("nepenthe::sign_histogram", mutates_args=())
def _sign_histogram(x: Tensor, channel_dim: int, upper: float | None, bins: int) -> Tensor:
    x3 = as_3d(x, channel_dim)
    hist = torch.zeros(x3.shape[1], bins, dtype=torch.int64, device=x.device)
    _, impl = select("sign_histogram", x.device, (x.dtype,))
    impl.sign_histogram_(hist, x3, upper)
    return hist


@_sign_histogram.register_fake
def _(x, channel_dim, upper, bins):
    return x.new_empty((x.shape[channel_dim], bins), dtype=torch.int64)


@custom_op("nepenthe::accumulate_sign_histogram_", mutates_args=("hist",))
def _accumulate_sign_histogram(hist: Tensor, x: Tensor, channel_dim: int, upper: float | None) -> None:
    buf, temporary = _contiguous_hist(hist)
    _, impl = select("sign_histogram", x.device, (x.dtype,))
    impl.sign_histogram_(buf, as_3d(x, channel_dim), upper)
    if temporary:
        hist += buf


@_accumulate_sign_histogram.register_fake
def _(hist, x, channel_dim, upper):
    return None


def sign_histogram(x: Tensor, channel_dim: int = 1, upper: float | None = None, bins: int = 4) -> Tensor:
    """Per-channel counts of the sign states of ``x`` as ``int64[C, bins]`` (ON, OFF, ZERO, SAT[, NONFINITE]).

    ``channel_dim`` is the neuron dimension (1 for N×C×H×W conv outputs, also channels_last; -1
    for Linear/token layers); every other dimension holds observations. ``upper`` is the
    rectifier's upper kink (6.0 for ReLU6) or None, in which case SAT is 0. ``bins=5`` adds the
    count of NaN/±Inf values. Runs on the fastest backend for the tensor's device.
    """
    _check_input(x, channel_dim, "sign_histogram")
    _check_bins(bins, "sign_histogram")
    return _sign_histogram(x.detach(), channel_dim, None if upper is None else float(upper), bins)


def accumulate_sign_histogram_(hist: Tensor, x: Tensor, channel_dim: int = 1, upper: float | None = None) -> Tensor:
    """Add the sign histogram of ``x`` into ``hist`` (int64[C, 4] or [C, 5]) in place and return it."""
    channels = _check_input(x, channel_dim, "accumulate_sign_histogram_")
    _check_hist(hist, channels, x.device, "accumulate_sign_histogram_")
    _accumulate_sign_histogram(hist, x.detach(), channel_dim, None if upper is None else float(upper))
    return hist


# ----- fused activation + histogram ---------------------------------------------------------------------


def _run_activation(x: Tensor, y: Tensor, hist: Tensor, kind: str, channel_dim: int, negative_slope: float) -> None:
    """y = φ(x) and the counts of x into hist, on the selected backend (y may be x itself)."""
    _, impl = select("activation_histogram", x.device, (x.dtype,))
    buf, temporary = _contiguous_hist(hist)
    upper = reference.upper_kink(kind)
    x3 = as_3d(x, channel_dim)
    y3 = view_3d(y, channel_dim)  # None only for strides no 3-d view fits (then x3 is a copy too)
    if y3 is not None:
        impl.activation_histogram_(x3, y3, buf, ACTIVATIONS.index(kind), negative_slope, upper)
    else:  # write a contiguous [outer, C, inner] temporary (logical order of y's dims), then y
        out = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
        impl.activation_histogram_(x3, out, buf, ACTIVATIONS.index(kind), negative_slope, upper)
        y.copy_(out.view(y.shape))
    if temporary:
        hist += buf


@custom_op("nepenthe::activation_histogram", mutates_args=())
def _activation_histogram(x: Tensor, kind: str, channel_dim: int, negative_slope: float,
                          bins: int) -> tuple[Tensor, Tensor]:
    y = torch.empty_like(x)
    hist = torch.zeros(x.shape[channel_dim], bins, dtype=torch.int64, device=x.device)
    _run_activation(x, y, hist, kind, channel_dim, negative_slope)
    return y, hist


@_activation_histogram.register_fake
def _(x, kind, channel_dim, negative_slope, bins):
    return torch.empty_like(x), x.new_empty((x.shape[channel_dim], bins), dtype=torch.int64)


def _activation_setup_context(ctx, inputs, output):
    x, kind, _, negative_slope, _ = inputs
    ctx.save_for_backward(x)
    ctx.kind, ctx.negative_slope = kind, negative_slope


def _activation_backward(ctx, grad_y, grad_hist):
    (x,) = ctx.saved_tensors
    return reference.activation_backward(grad_y, x, ctx.kind, ctx.negative_slope), None, None, None, None


_activation_histogram.register_autograd(_activation_backward, setup_context=_activation_setup_context)


@custom_op("nepenthe::activation_histogram_", mutates_args=("x", "hist"))
def _activation_histogram_inplace(x: Tensor, hist: Tensor, kind: str, channel_dim: int,
                                  negative_slope: float) -> None:
    _run_activation(x, x, hist, kind, channel_dim, negative_slope)


@_activation_histogram_inplace.register_fake
def _(x, hist, kind, channel_dim, negative_slope):
    return None


def activation_histogram(x: Tensor, kind: str = "relu", channel_dim: int = 1, *, negative_slope: float = 0.01,
                         bins: int = 4) -> tuple[Tensor, Tensor]:
    """``(φ(x), sign histogram of x)`` in one pass over ``x``; differentiable in ``x``.

    ``kind`` is one of ``relu, relu6, leaky_relu, gelu, gelu_tanh, silu, hardswish``; the histogram
    counts the *input* of φ (SAT at 6 for relu6). Use it in place of the activation to measure
    while training; add the histogram into a running buffer.
    """
    what = f"activation_histogram({kind!r})"
    _check_kind(kind, what)
    _check_input(x, channel_dim, what)
    _check_activation_input(x, what)
    _check_bins(bins, what)
    return _activation_histogram(x, kind, channel_dim, float(negative_slope), bins)


def activation_histogram_(x: Tensor, hist: Tensor, kind: str = "relu", channel_dim: int = 1, *,
                          negative_slope: float = 0.01) -> Tensor:
    """Inplace ``x = φ(x)`` that adds the sign histogram of the old ``x`` into ``hist``; returns ``x``.

    Not differentiable (like any inplace op on a tensor autograd needs): use it under
    ``torch.no_grad()``, e.g. to measure a model with inplace activations.
    """
    what = f"activation_histogram_({kind!r})"
    _check_kind(kind, what)
    channels = _check_input(x, channel_dim, what)
    _check_activation_input(x, what)
    _check_hist(hist, channels, x.device, what)
    _activation_histogram_inplace(x, hist, kind, channel_dim, float(negative_slope))
    return x


# ----- entropy ------------------------------------------------------------------------------------------


@custom_op("nepenthe::entropy_from_histogram", mutates_args=())
def _entropy_from_histogram(hist: Tensor, zero_as: str, aggregate: str) -> tuple[Tensor, Tensor]:
    # Deliberately no kernel: the input is a [C, 4] count table, a few microseconds of PyTorch math.
    return reference.entropy_from_histogram(hist, zero_as, aggregate)


@_entropy_from_histogram.register_fake
def _(hist, zero_as, aggregate):
    return hist.new_empty(hist.shape[0], dtype=torch.float64), hist.new_empty((), dtype=torch.float64)


def entropy_from_histogram(hist: Tensor, zero_as: str = "exclude", aggregate: str = "mean") -> tuple[Tensor, Tensor]:
    """(per-neuron entropy float64[C], layer entropy float64 scalar tensor) of a sign histogram (SPEC §1).

    ``zero_as``: "exclude" (paper), "off" (EGP) or "on" (EASIER); ``aggregate``: "mean",
    "mixed_mean" (EGP) or "sum".
    """
    if zero_as not in ZERO_AS:
        raise ValueError(f"zero_as must be one of {ZERO_AS}, got {zero_as!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if not isinstance(hist, Tensor) or hist.dim() != 2 or hist.shape[1] < 4 or hist.is_floating_point():
        got = f"{hist.dtype}{list(hist.shape)}" if isinstance(hist, Tensor) else type(hist).__name__
        raise ValueError(f"entropy_from_histogram: expected an integer histogram [C, 4] (ON, OFF, ZERO, SAT), "
                         f"got {got}")
    return _entropy_from_histogram(hist, zero_as, aggregate)


# ----- masked optimizer steps ---------------------------------------------------------------------------


def _check_lists(op: str, params: list[Tensor], named: dict[str, list], masks: list) -> None:
    for name, tensors in named.items():
        if len(tensors) != len(params):
            raise ValueError(f"{op}: {name} has {len(tensors)} tensors for {len(params)} parameters")
    if len(masks) != len(params):
        raise ValueError(f"{op}: masks has {len(masks)} entries for {len(params)} parameters (use None for no mask)")
    for i, p in enumerate(params):
        if not p.is_floating_point():
            raise ValueError(f"{op}: parameter {i} is {p.dtype}; only floating-point parameters can be optimized")
        for name, tensors in named.items():
            t = tensors[i]
            if t.shape != p.shape or t.device != p.device:
                raise ValueError(f"{op}: {name}[{i}] has shape {tuple(t.shape)} on {t.device}, parameter {i} "
                                 f"{tuple(p.shape)} on {p.device}")
            if t.is_sparse:
                raise ValueError(f"{op}: {name}[{i}] is sparse; masked steps need dense gradients and state")
        m = masks[i]
        if m is not None and (m.dtype != torch.bool or m.shape != p.shape or m.device != p.device):
            raise ValueError(f"{op}: mask {i} must be a bool tensor of shape {tuple(p.shape)} on {p.device}, got "
                             f"{m.dtype}{list(m.shape)} on {m.device}")


def _groups(op: str, params: list[Tensor], lists: list[list[Tensor]], masks: list):
    """Split parameter indices by (backend implementation): kernel-ready ones grouped per device, and
    the rest (non-contiguous, mixed dtypes, dtypes without kernels) for the reference."""
    by_device: dict[torch.device, list[int]] = {}
    odd: list[int] = []
    for i, p in enumerate(params):
        same = all(t[i].dtype == p.dtype and t[i].is_contiguous() for t in lists)
        mask_ok = masks[i] is None or masks[i].is_contiguous()
        if p.dtype in KERNEL_DTYPES and p.is_contiguous() and same and mask_ok:
            by_device.setdefault(p.device, []).append(i)
        else:
            odd.append(i)
    groups = []
    for device, idx in by_device.items():
        _, impl = select(op, device, tuple({params[i].dtype for i in idx}))
        groups.append((impl, idx))
    if odd:
        groups.append((reference, odd))
    return groups


def _pick(seq, idx):
    return [seq[i] for i in idx]


def _eager_cpp(op: str, params: list[Tensor]):
    """The ``cpp`` backend when an optimizer call may go straight to its kernel, skipping the custom-op
    machinery (whose per-call Python cost, ~0.5 ms for a ResNet-18's 62 parameters, is a tenth of the
    step itself): eager (not compiling, no torch-function or dispatch mode), grad mode off (as inside
    ``Optimizer.step``), CPU parameters and ``cpp`` the backend selected for them. None otherwise.
    The kernel validates every tensor before it writes any, so a call it rejects (bad arguments,
    non-contiguous or mixed tensors) is simply redone on the full path, which raises the Python error
    or handles the odd tensors."""
    if (torch.is_grad_enabled() or torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
            or _get_current_dispatch_mode() is not None):
        return None
    p = params[0]
    if p.device.type != "cpu":
        return None
    name, impl = select(op, p.device, (p.dtype,))
    return impl if name == "cpp" else None


@custom_op("nepenthe::masked_sgd_", mutates_args=("params", "momentum_buffers"))
def _masked_sgd(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
                masks: list[Tensor | None], lr: float, momentum: float, dampening: float, weight_decay: float,
                nesterov: bool, maximize: bool, first_step: bool) -> None:
    grads = [g.contiguous() for g in grads]
    lists = [grads] + ([momentum_buffers] if momentum != 0 else [])
    for impl, idx in _groups("masked_sgd_", params, lists, masks):
        bufs = _pick(momentum_buffers, idx) if momentum != 0 else []
        impl.masked_sgd_(_pick(params, idx), _pick(grads, idx), bufs, _pick(masks, idx), lr, momentum, dampening,
                         weight_decay, nesterov, maximize, first_step)


@_masked_sgd.register_fake
def _(params, grads, momentum_buffers, masks, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step):
    return None


def masked_sgd_(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
                masks: list[Tensor | None], *, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False,
                first_step: bool = False) -> None:
    """One ``torch.optim.SGD`` step over many parameters, with the masks applied in the same pass.

    Masked entries (mask False) of each parameter and of its momentum buffer end exactly zero.
    ``momentum_buffers``: one per parameter when ``momentum != 0`` (on ``first_step`` they are
    overwritten with the gradient, as torch.optim.SGD initialises them), else empty.
    """
    named = {"grads": grads}
    if momentum != 0:
        named["momentum_buffers"] = momentum_buffers
    elif momentum_buffers:
        raise ValueError("masked_sgd_: momentum_buffers must be empty when momentum == 0")
    impl = _eager_cpp("masked_sgd_", params) if params else None
    if impl is not None:
        bufs = list(momentum_buffers)
        try:
            impl.masked_sgd_(params, grads, bufs, masks, float(lr), float(momentum), float(dampening),
                             float(weight_decay), bool(nesterov), bool(maximize), bool(first_step))
        except RuntimeError:
            pass  # rejected before any write: the full path below
        else:
            torch._C._increment_version(params + bufs)  # as the custom op does for its mutated arguments
            return
    _check_lists("masked_sgd_", params, named, masks)
    if not params:
        return
    _masked_sgd(params, grads, list(momentum_buffers), list(masks), float(lr), float(momentum), float(dampening),
                float(weight_decay), bool(nesterov), bool(maximize), bool(first_step))


@custom_op("nepenthe::masked_adamw_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"))
def _masked_adamw(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                  max_exp_avg_sqs: list[Tensor], masks: list[Tensor | None], lr: float, beta1: float, beta2: float,
                  eps: float, weight_decay: float, step: int, amsgrad: bool, maximize: bool) -> None:
    grads = [g.contiguous() for g in grads]
    lists = [grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    for impl, idx in _groups("masked_adamw_", params, lists, masks):
        maxes = _pick(max_exp_avg_sqs, idx) if amsgrad else []
        impl.masked_adamw_(_pick(params, idx), _pick(grads, idx), _pick(exp_avgs, idx), _pick(exp_avg_sqs, idx),
                           maxes, _pick(masks, idx), lr, beta1, beta2, eps, weight_decay, step, amsgrad, maximize)


@_masked_adamw.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks, lr, beta1, beta2, eps, weight_decay, step,
      amsgrad, maximize):
    return None


def masked_adamw_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                  max_exp_avg_sqs: list[Tensor], masks: list[Tensor | None], *, lr: float, beta1: float = 0.9,
                  beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2, step: int,
                  amsgrad: bool = False, maximize: bool = False) -> None:
    """One ``torch.optim.AdamW`` step at step count ``step`` (≥ 1, already incremented) over many
    parameters, with the masks applied in the same pass: masked entries of each parameter and of
    its moments end exactly zero. ``max_exp_avg_sqs`` is used (one per parameter) only with amsgrad."""
    if step < 1:
        raise ValueError(f"masked_adamw_: step must be >= 1 (the count after this step), got {step}")
    named = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        named["max_exp_avg_sqs"] = max_exp_avg_sqs
    impl = _eager_cpp("masked_adamw_", params) if params else None
    if impl is not None:
        maxes = list(max_exp_avg_sqs) if amsgrad else []
        try:
            impl.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, maxes, masks, float(lr), float(beta1),
                               float(beta2), float(eps), float(weight_decay), int(step), bool(amsgrad), bool(maximize))
        except RuntimeError:
            pass  # rejected before any write: the full path below
        else:
            torch._C._increment_version(list(params) + list(exp_avgs) + list(exp_avg_sqs) + maxes)
            return
    _check_lists("masked_adamw_", params, named, masks)
    if not params:
        return
    _masked_adamw(params, grads, exp_avgs, exp_avg_sqs, list(max_exp_avg_sqs) if amsgrad else [], list(masks),
                  float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), int(step), bool(amsgrad),
                  bool(maximize))
