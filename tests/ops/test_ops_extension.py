"""The backend ops of the compiled extension (``torch.ops.nepenthe_ext.*``) pass ``opcheck`` like the
public ``nepenthe::`` ops: schema (mutation annotations), fake kernels, autograd registration and
functionalisation. Skipped where nepenthe._C is not built."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from nepenthe.ops import backends


@pytest.fixture(scope="module")
def ext_ops():
    try:
        backends.load("cpp")
    except backends.BackendUnavailable as exc:
        pytest.skip(str(exc))
    return torch.ops.nepenthe_ext


def test_sign_histogram_(ext_ops):
    x = torch.randn(2, 3, 5)
    opcheck(ext_ops.sign_histogram_.default, (torch.zeros(3, 5, dtype=torch.long), x, None))
    opcheck(ext_ops.sign_histogram_.default, (torch.zeros(3, 4, dtype=torch.long), x, 6.0))


@pytest.mark.parametrize("kind", [0, 3, 5])  # relu, gelu, silu
def test_activation_histogram_(ext_ops, kind):
    x = torch.randn(2, 3, 5)
    opcheck(ext_ops.activation_histogram_.default, (x, torch.empty_like(x), torch.zeros(3, 5, dtype=torch.long),
                                                    kind, 0.01, None))


def test_masked_optimizer_steps(ext_ops):
    torch.manual_seed(0)
    params, grads = [torch.randn(4, 3), torch.randn(7)], [torch.randn(4, 3), torch.randn(7)]
    masks = [torch.rand(4, 3) > 0.5, None]
    opcheck(ext_ops.masked_sgd_.default, (params, grads, [torch.zeros(4, 3), torch.zeros(7)], masks, 0.1, 0.9, 0.0,
                                          1e-4, False, False, False))
    opcheck(ext_ops.masked_adamw_.default, (params, grads, [torch.zeros(4, 3), torch.zeros(7)],
                                            [torch.zeros(4, 3), torch.zeros(7)], [], masks, 1e-3, 0.9, 0.999, 1e-8,
                                            0.01, 1, False, False))
