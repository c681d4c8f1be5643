"""Layer 1: nepenthe's numerical ops, as ``torch.library`` custom ops with fused backends.

* Sign histograms: :func:`sign_histogram`, :func:`accumulate_sign_histogram_` (int64[C, 4]:
  ON, OFF, ZERO, SAT; ``bins=5`` adds NONFINITE).
* Fused activation + histogram in one pass: :func:`activation_histogram` (differentiable) and
  the inplace :func:`activation_histogram_` and the accumulating
  :func:`accumulate_activation_histogram`, for relu, relu6, leaky_relu, gelu, gelu_tanh, silu,
  hardswish.
* Entropies: :func:`entropy_from_histogram` (SPEC §1 options) and the reference helpers below.
* Masked optimizer steps: :func:`masked_sgd_`, :func:`masked_adamw_` (multi-tensor), and the
  drop-in optimizers :class:`MaskedSGD`, :class:`MaskedAdamW`.

Backends (C++ CPU, CUDA C++, Triton, PyTorch reference) are chosen per call: see
:mod:`nepenthe.ops.backends`, :func:`use_backend` and the ``NEPENTHE_BACKEND`` environment variable.
:mod:`nepenthe.ops.reference` holds the pure-PyTorch oracle of every op.
"""

from . import backends, reference
from .backends import BackendUnavailable, available_backends, use_backend
from .library import (
    accumulate_activation_histogram,
    accumulate_sign_histogram_,
    activation_histogram,
    activation_histogram_,
    entropy_from_histogram,
    masked_adamw_,
    masked_sgd_,
    sign_histogram,
)
from .optim import MaskedAdamW, MaskedSGD
from .reference import (
    ACTIVATIONS,
    AGGREGATES,
    HISTOGRAM_BINS,
    NONFINITE,
    NUM_STATES,
    OFF,
    ON,
    SAT,
    STATE_NAMES,
    ZERO,
    ZERO_AS,
    aggregate_layer_entropy,
    apply_mask_,
    binary_entropy,
    neuron_entropy_from_histogram,
    state_counts,
    upper_kink,
)

__all__ = [
    "ACTIVATIONS", "AGGREGATES", "HISTOGRAM_BINS", "NONFINITE", "NUM_STATES", "OFF", "ON", "SAT", "STATE_NAMES", "ZERO",
    "ZERO_AS", "BackendUnavailable", "MaskedAdamW", "MaskedSGD", "accumulate_activation_histogram",
    "accumulate_sign_histogram_", "activation_histogram",
    "activation_histogram_", "aggregate_layer_entropy", "apply_mask_", "available_backends", "backends",
    "binary_entropy", "entropy_from_histogram", "masked_adamw_", "masked_sgd_", "neuron_entropy_from_histogram",
    "reference", "sign_histogram", "state_counts", "upper_kink", "use_backend",
]
