"""The facts every layer of the ops shares, defined once: histogram columns, entropy options,
activation kinds (their index is the integer code of csrc/ and kernels/) and the dtypes the compiled
kernels take. ``kernels/`` imports this file too."""

from __future__ import annotations

import torch

__all__ = ["ACTIVATIONS", "AGGREGATES", "GELU", "GELU_TANH", "HARDSWISH", "HISTOGRAM_BINS", "KERNEL_DTYPES",
           "LEAKY_RELU", "NONFINITE", "NUM_STATES", "OFF", "ON", "RELU", "RELU6", "RELU6_UPPER", "SAT", "SILU",
           "STATE_NAMES", "ZERO", "ZERO_AS", "upper_kink"]

# Histogram columns: int64[C, 4] ON, OFF, ZERO, SAT (+ NONFINITE with 5 bins); see nepenthe.ops.reference.
ON, OFF, ZERO, SAT, NONFINITE = 0, 1, 2, 3, 4
NUM_STATES = 4
HISTOGRAM_BINS = (4, 5)
STATE_NAMES = ("on", "off", "zero", "sat")

ZERO_AS = ("exclude", "off", "on")
AGGREGATES = ("mean", "mixed_mean", "sum")

# Activations with a fused forward + histogram. The index of a kind is its integer code in the
# compiled backends (csrc/ and kernels/ use the same numbering).
ACTIVATIONS = ("relu", "relu6", "leaky_relu", "gelu", "gelu_tanh", "silu", "hardswish")
RELU, RELU6, LEAKY_RELU, GELU, GELU_TANH, SILU, HARDSWISH = range(len(ACTIVATIONS))
RELU6_UPPER = 6.0


def upper_kink(kind: str) -> float | None:
    """The SAT threshold the histogram of an activation kind counts (None: no upper kink)."""
    return RELU6_UPPER if kind == "relu6" else None

# dtypes with a compiled (C++, CUDA, Triton) kernel; others run on the "torch" backend
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
