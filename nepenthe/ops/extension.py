"""The compiled backends (``cpp`` on CPU tensors, ``cuda`` on CUDA tensors): thin calls into the
extension ``nepenthe._C``, whose ops live in the ``torch.ops.nepenthe_ext`` namespace and are
dispatched to the CPU or CUDA kernel by the tensors' device (csrc/nepenthe_ext.cpp declares the
schemas, csrc/cpu/ and csrc/cuda/ register one implementation each), with fake kernels registered
here. Contract: see :mod:`nepenthe.ops.backends`."""

from __future__ import annotations

import torch

__all__ = ["activation_histogram_", "masked_adamw_", "masked_sgd_", "sign_histogram_"]

_ops = torch.ops.nepenthe_ext


def _register_fake_kernels() -> None:
    """Fake (meta) kernels of the ``nepenthe_ext::`` ops: all four only mutate their arguments and
    return nothing, so tracing them (fake tensors, torch.compile, opcheck) needs no computation."""
    for op in ("sign_histogram_", "activation_histogram_", "masked_sgd_", "masked_adamw_"):
        torch.library.register_fake(f"nepenthe_ext::{op}")(lambda *args, **kwargs: None)


_register_fake_kernels()  # once: this module is imported after nepenthe._C registered the schemas


def sign_histogram_(hist, x3, upper):
    _ops.sign_histogram_(hist, x3, upper)


def activation_histogram_(x3, y3, hist, kind, negative_slope, upper):
    _ops.activation_histogram_(x3, y3, hist, kind, negative_slope, upper)


def masked_sgd_(params, grads, momentum_buffers, masks, lr, momentum, dampening, weight_decay, nesterov, maximize,
                first_step):
    _ops.masked_sgd_(params, grads, momentum_buffers, masks, lr, momentum, dampening, weight_decay, nesterov,
                     maximize, first_step)


def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks, lr, beta1, beta2, eps, weight_decay,
                  step, amsgrad, maximize):
    _ops.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks, lr, beta1, beta2, eps,
                       weight_decay, step, amsgrad, maximize)
