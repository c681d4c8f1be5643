"""Benchmark cases for the fused ops: each builder returns ``{provider: zero-argument callable}`` doing
the same work, so that the nepenthe op and the plain PyTorch ways are timed side by side.

Providers: ``nepenthe`` (the public op on the automatic backend), ``torch`` (the best plain eager
PyTorch expression we found), ``torch+…`` variants named for what they add, ``compile``
(``torch.compile`` of the plain expression, compiled on its first call). Used by
``bench_kernels.py`` (pytest-benchmark) and ``compare_kernels.py`` (interleaved timing, RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import nepenthe
from nepenthe import ops
from nepenthe.models import resnet18_cifar
from nepenthe.testing import activation_tensor  # shared with the tests

Case = dict[str, Callable[[], object]]


def _reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(d for d in range(x.dim()) if d != 1)


def plain_sign_histogram(x: torch.Tensor) -> torch.Tensor:
    """ON / OFF / ZERO per channel of an N×C×... tensor: the three comparisons, one reduction each."""
    dims = _reduce_dims(x)
    return torch.stack([(x > 0).sum(dims), (x < 0).sum(dims), (x == 0).sum(dims)], dim=1)


def plain_sign_histogram_2pass(x: torch.Tensor) -> torch.Tensor:
    """Two passes: ZERO from the total (exact for finite inputs only, which is why it is not ours)."""
    dims = _reduce_dims(x)
    on, off = (x > 0).sum(dims), (x < 0).sum(dims)
    return torch.stack([on, off, x.numel() // x.shape[1] - on - off], dim=1)


def histogram_case(shape, dtype=torch.float32, channels_last=False, device="cpu") -> Case:
    """sign_histogram over channel dim 1 of an activation tensor (N×C×H×W, or a Linear-like [rows, C]).

    ``torch_sum`` is ``x.sum()``: not the same work, but the read-rate reference (one pass over the
    same bytes) the histogram is held to; see :func:`bytes_read`.
    """
    x = activation_tensor(shape, dtype, channels_last and len(shape) == 4, device)
    compiled = torch.compile(plain_sign_histogram, dynamic=False)
    return {"nepenthe": lambda: ops.sign_histogram(x, 1),
            "torch": lambda: plain_sign_histogram(x),
            "torch_2pass": lambda: plain_sign_histogram_2pass(x),
            "torch_sum": lambda: x.sum(),
            "compile": lambda: compiled(x)}


def bytes_read(shape, dtype=torch.float32) -> int:
    """Bytes one pass over an activation tensor of this shape and dtype reads (for GB/s)."""
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


PLAIN_ACTIVATIONS = {"relu": F.relu, "relu6": F.relu6, "gelu": F.gelu,
                     "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "hardswish": F.hardswish}


def activation_case(kind, shape, dtype=torch.float32, channels_last=False, device="cpu") -> Case:
    """The fused activation + histogram vs the plain activation alone (the 1.10x target) and vs the
    activation followed by the plain histogram."""
    x = activation_tensor(shape, dtype, channels_last, device)
    act = PLAIN_ACTIVATIONS[kind]

    def unfused():
        return act(x), plain_sign_histogram(x)
    compiled = torch.compile(unfused, dynamic=False)
    return {"nepenthe": lambda: ops.activation_histogram(x, kind, 1),
            "torch_activation_only": lambda: act(x),
            "torch+histogram": unfused,
            "compile": compiled}


def resnet18_parameters(device="cpu", dtype=torch.float32, masked_fraction=0.5, seed=0):
    """The CIFAR ResNet-18's parameters (11.2M in 62 tensors) with gradients and random masks on
    every weight of dim > 1 (as pruning leaves them)."""
    torch.manual_seed(seed)
    model = resnet18_cifar(num_classes=10).to(device=device, dtype=dtype)
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    masks = {p: torch.rand(p.shape, device=device) >= masked_fraction for p in params if p.dim() > 1}
    return params, masks


def _mask_multiply(masks: dict) -> Callable[[], None]:
    params, keep = list(masks), [m.to(next(iter(masks)).dtype) for m in masks.values()]

    @torch.no_grad()
    def apply():
        torch._foreach_mul_(params, keep)
    return apply


SGD_KWARGS = dict(lr=0.01, momentum=0.9)
ADAMW_KWARGS = dict(lr=1e-3)


def sgd_case(device="cpu", dtype=torch.float32, weight_decay=5e-4) -> Case:
    """One SGD step (momentum 0.9) over the ResNet-18 parameters in ``dtype`` (fp32 / bf16 params,
    state in the same dtype). ``torch_fused_unmasked``: torch.optim.SGD(fused=True), torch's fastest
    step (CPU too), the target; ``torch_unmasked``: foreach=True; ``torch+mask``: foreach step then
    the masks multiplied in.

    Caveat (torch 2.13 CPU): SGD(fused=True) on bf16 parameters is wrong: its vector loop never
    stores the parameter (only each tensor's scalar tail, size % 32 here, is updated) and reads the
    bf16 momentum buffer as fp32, so it moves ~8 bytes per element where a correct step moves 10."""
    params, masks = resnet18_parameters(device, dtype)
    kwargs = dict(SGD_KWARGS, weight_decay=weight_decay)
    ours = ops.MaskedSGD(params, masks=masks, **kwargs)
    packed = ops.MaskedSGD(params, masks=masks, pack_masks=True, **kwargs)
    fused = torch.optim.SGD(params, fused=True, **kwargs)
    plain = torch.optim.SGD(params, foreach=True, **kwargs)
    then_mask = _mask_multiply(masks)
    compiled_step = torch.compile(plain.step, dynamic=False)

    def plain_then_mask():
        plain.step()
        then_mask()
    return {"nepenthe": ours.step, "nepenthe_packed": packed.step, "torch_fused_unmasked": fused.step,
            "torch_unmasked": plain.step, "torch+mask": plain_then_mask, "compile_unmasked": compiled_step}


def adamw_case(device="cpu", dtype=torch.float32, weight_decay=1e-2) -> Case:
    """One AdamW step over the ResNet-18 parameters in ``dtype``; providers as in :func:`sgd_case`
    (``torch_fused_unmasked`` = torch.optim.AdamW(fused=True), on CPU tensors too)."""
    params, masks = resnet18_parameters(device, dtype)
    kwargs = dict(ADAMW_KWARGS, weight_decay=weight_decay)
    ours = ops.MaskedAdamW(params, masks=masks, **kwargs)
    packed = ops.MaskedAdamW(params, masks=masks, pack_masks=True, **kwargs)
    fused = torch.optim.AdamW(params, fused=True, **kwargs)
    plain = torch.optim.AdamW(params, foreach=True, **kwargs)
    then_mask = _mask_multiply(masks)

    def plain_then_mask():
        plain.step()
        then_mask()
    return {"nepenthe": ours.step, "nepenthe_packed": packed.step, "torch_fused_unmasked": fused.step,
            "torch_unmasked": plain.step, "torch+mask": plain_then_mask}


def measure_case(batch=64, batches=4, device="cpu") -> Case:
    """``nepenthe.measure`` of the CIFAR ResNet-18 over a few batches vs the same eval forwards.

    ``nepenthe_measure`` is the steady state of a pruning loop (the model's probed trace is kept
    between calls); ``nepenthe_measure_cold`` traces the model again on every call.
    """
    from nepenthe.entropy import clear_trace_cache

    torch.manual_seed(0)
    model = resnet18_cifar(num_classes=10).to(device).eval()
    data = [torch.randn(batch, 3, 32, 32, device=device) for _ in range(batches)]

    def forwards():
        with torch.no_grad():
            for x in data:
                model(x)

    def cold():
        clear_trace_cache()
        return nepenthe.measure(model, data, distributed=False)
    return {"nepenthe_measure": lambda: nepenthe.measure(model, data, distributed=False),
            "nepenthe_measure_cold": cold,
            "torch_forward": forwards}
