"""Triton kernels of nepenthe (installed as ``nepenthe.kernels``): the ``triton`` backend.

One file per op, kernel and launcher together: :mod:`.sign_histogram`, :mod:`.activation_histogram`,
:mod:`.masked_optim`. The four functions below follow the backend contract of
:mod:`nepenthe.ops.backends`. On a machine without a GPU they run only through the Triton
interpreter, which must be switched on (``TRITON_INTERPRET=1``) before this package is imported.

``AVAILABLE`` says whether the kernels loaded; ``UNAVAILABLE_REASON`` says why not.
"""

AVAILABLE = False
UNAVAILABLE_REASON: str | None = None

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as exc:  # ImportError, or a broken install raising anything else
    UNAVAILABLE_REASON = f"Triton is not importable ({type(exc).__name__}: {exc}); pip install triton"
else:
    try:
        from .activation_histogram import activation_histogram_
        from .masked_optim import masked_adamw_, masked_sgd_
        from .sign_histogram import sign_histogram_
    except Exception as exc:
        UNAVAILABLE_REASON = f"the Triton kernels failed to load ({type(exc).__name__}: {exc})"
    else:
        AVAILABLE = True

if not AVAILABLE:
    def _unavailable(*args, **kwargs):
        raise RuntimeError(f"nepenthe Triton kernels are unavailable: {UNAVAILABLE_REASON}")

    sign_histogram_ = activation_histogram_ = masked_sgd_ = masked_adamw_ = _unavailable

__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "activation_histogram_", "masked_adamw_", "masked_sgd_",
           "sign_histogram_"]
