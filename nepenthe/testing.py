"""Support tier: what nepenthe's tests and benchmarks share (and code built on nepenthe may use to
test its own kernels against the reference): the devices and dtypes to run on, per-dtype
tolerances, and builders of signed values that hit every sign state exactly.

    from nepenthe.testing import DTYPES, signed_values, tolerance
    x = signed_values((8, 16, 5, 5), torch.bfloat16, upper=6.0)   # exact zeros, -0.0 and ties at 6
    torch.testing.assert_close(mine(x), reference(x), **tolerance(torch.bfloat16))
"""

from __future__ import annotations

import torch

__all__ = ["ALL_DTYPES", "DTYPES", "activation_tensor", "devices", "signed_values", "tolerance"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what users train and measure in
ALL_DTYPES = DTYPES + (torch.float64,)

# Float results against the reference (the optimizer steps, activations): about 2x what PyTorch's
# own result of the dtype is off by (the flash-attention rule). Integer counts are always exact.
_TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2),
               torch.float64: (1e-12, 1e-12)}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``rtol`` / ``atol`` keyword arguments of ``torch.testing.assert_close`` for ``dtype``."""
    rtol, atol = _TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def devices() -> list[str]:
    """The devices to test on here: the CPU, and CUDA when a GPU is visible."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def signed_values(shape, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", *,
                  upper: float | None = None, seed: int = 0, scale: float = 4.0, zeros: float = 0.15,
                  negative_zeros: float = 0.05) -> torch.Tensor:
    """Random values (``randn * scale``) in which a ``zeros`` fraction is exactly +0.0, a
    ``negative_zeros`` fraction -0.0 and, with ``upper``, a tenth is exactly the upper kink: every
    sign state and every tie a histogram must count exactly. Seeded, generated on the CPU."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    pick = torch.rand(shape, generator=g)
    x = torch.where(pick < zeros, torch.zeros_like(x), x)
    x = torch.where((pick >= zeros) & (pick < zeros + negative_zeros), torch.full_like(x, -0.0), x)
    if upper is not None:
        x = torch.where(torch.rand(shape, generator=g) < 0.1, torch.full_like(x, upper), x)
    return x.to(dtype=dtype, device=device)


def activation_tensor(shape, dtype: torch.dtype = torch.float32, channels_last: bool = False,
                      device: torch.device | str = "cpu", seed: int = 0) -> torch.Tensor:
    """A pre-activation as a network makes it (``randn``), in NCHW or channels_last."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype=dtype, device=device)
    return x.to(memory_format=torch.channels_last) if channels_last else x
