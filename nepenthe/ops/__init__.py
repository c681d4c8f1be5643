"""Layer 1: nepenthe's numerical ops, as ``torch.library`` custom ops with fused backends.

One file per public op, like ``kernels/<op>.py`` (:mod:`nepenthe.kernels`) and ``csrc/*/<op>_*``:

* :mod:`~nepenthe.ops.sign_histogram` — :func:`sign_histogram`, :func:`accumulate_sign_histogram_`
  (int64[C, 4]: ON, OFF, ZERO, SAT; ``bins=5`` adds NONFINITE);
* :mod:`~nepenthe.ops.activation_histogram` — φ(x) and the histogram of x in one pass:
  :func:`activation_histogram` (differentiable), the inplace :func:`activation_histogram_` and the
  accumulating :func:`accumulate_activation_histogram`, for relu, relu6, leaky_relu, gelu,
  gelu_tanh, silu, hardswish;
* :mod:`~nepenthe.ops.entropy` — :func:`entropy_from_histogram` (docs/method.md §1 options) and its math;
* :mod:`~nepenthe.ops.masked_optim` — :func:`masked_sgd_`, :func:`masked_adamw_` (multi-tensor),
  :func:`apply_mask_`; :mod:`~nepenthe.ops.optim` — the drop-in optimizers :class:`MaskedSGD`,
  :class:`MaskedAdamW`; :mod:`~nepenthe.ops.mask_bits` — bit-packed masks (:func:`pack_mask`,
  :func:`unpack_mask`), one bit per weight, which the masked steps take as well as bool masks.

Beside them: :mod:`~nepenthe.ops.constants` (histogram columns, activation kinds, kernel dtypes;
``kernels/`` imports it too), :mod:`~nepenthe.ops._args` (argument rules, tensor layout),
:mod:`~nepenthe.ops.backends` (the dispatcher), :mod:`~nepenthe.ops.extension` (the compiled ops)
and :mod:`~nepenthe.ops.reference` (the pure-PyTorch oracle every backend is tested against; it
is also the ``torch`` backend).

**Two namespaces.** ``torch.ops.nepenthe.*`` are the public ops: each checks its arguments, has a
fake kernel (``opcheck`` passes, it stays one opaque node under ``torch.compile(fullgraph=True)``)
and chooses its backend *when it runs* — never baked into a compiled graph — by device, dtype,
``NEPENTHE_BACKEND`` or :func:`use_backend`. ``torch.ops.nepenthe_ext.*`` are the backend kernels
of the compiled extension ``nepenthe._C`` (C++ on CPU, CUDA C++ on GPU tensors, dispatched by the
tensors' device): raw, pre-validated, ``[outer, C, inner]`` views only; they have fake kernels and
pass ``opcheck`` too, but user code calls the public ops. Plain eager calls of the public ops skip
the ``torch.library`` dispatch and run the same implementation directly (tens of µs a call).
"""

from . import backends, reference
from .activation_histogram import accumulate_activation_histogram, activation_histogram, activation_histogram_
from .backends import BackendUnavailable, available_backends, use_backend
from .constants import (
    ACTIVATIONS,
    AGGREGATES,
    HISTOGRAM_BINS,
    KERNEL_DTYPES,
    NONFINITE,
    NUM_STATES,
    OFF,
    ON,
    SAT,
    STATE_NAMES,
    ZERO,
    ZERO_AS,
    upper_kink,
)
from .entropy import (
    aggregate_layer_entropy,
    binary_entropy,
    entropy_from_histogram,
    neuron_entropy_from_histogram,
    state_counts,
)
from .mask_bits import pack_mask, packed_mask_bytes, unpack_mask
from .masked_optim import apply_mask_, masked_adamw_, masked_sgd_
from .optim import MaskedAdamW, MaskedSGD
from .sign_histogram import accumulate_sign_histogram_, sign_histogram

__all__ = [
    "ACTIVATIONS", "AGGREGATES", "HISTOGRAM_BINS", "KERNEL_DTYPES", "NONFINITE", "NUM_STATES", "OFF", "ON", "SAT",
    "STATE_NAMES", "ZERO", "ZERO_AS", "BackendUnavailable", "MaskedAdamW", "MaskedSGD",
    "accumulate_activation_histogram", "accumulate_sign_histogram_", "activation_histogram", "activation_histogram_",
    "aggregate_layer_entropy", "apply_mask_", "available_backends", "backends", "binary_entropy",
    "entropy_from_histogram", "masked_adamw_", "masked_sgd_", "neuron_entropy_from_histogram", "pack_mask",
    "packed_mask_bytes", "reference", "sign_histogram", "state_counts", "unpack_mask", "upper_kink", "use_backend",
]
