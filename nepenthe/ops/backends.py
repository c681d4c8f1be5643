"""Which implementation runs each op: backend registry, selection and fallback.

Backends (DESIGN.md layer 1):

=========  =====================================================  ===========================
name       implementation                                         runs on
=========  =====================================================  ===========================
``cuda``   CUDA C++ kernels of the extension ``nepenthe._C``       CUDA tensors
``triton`` Triton kernels, ``nepenthe.kernels``                    CUDA tensors (CPU tensors
                                                                  only under TRITON_INTERPRET=1)
``cpp``    C++ OpenMP kernels of ``nepenthe._C``                   CPU tensors
``torch``  pure PyTorch, :mod:`nepenthe.ops.reference`             anything (the test oracle)
=========  =====================================================  ===========================

Choice, per call: an explicit request (``with nepenthe.ops.use_backend("cpp"):`` or the
environment variable ``NEPENTHE_BACKEND=triton|cuda|cpp|torch``) wins, and raises
:class:`BackendUnavailable` when that backend cannot run the call. Otherwise the first backend of
the device's preference list that loads and supports the dtype is used (CUDA: cuda, triton, torch;
CPU: cpp, torch); a backend that fails to load is skipped with one warning saying why.

**The backend contract.** A backend is any object with these four functions; the public ops (one
module each: ``sign_histogram``, ``activation_histogram``, ...) validate arguments and lay tensors
out before calling them, so a backend may rely on what is written here and nothing more. The
edge-case rules are decided before dispatch, the same for every backend (:mod:`._args`,
:mod:`.reference`): a tensor written in place never has elements sharing memory, optimizer
hyperparameters are in range (beta < 1, finite rates), φ(±inf) is φ's limit, and fp16/bf16 steps
compute in fp32 and round once on store:

``sign_histogram_(hist, x3, upper)``
    Add the sign counts of ``x3`` into ``hist``. ``x3``: a 3-D ``[outer, C, inner]`` tensor of
    fp32/fp16/bf16/fp64 with *arbitrary strides* (contiguous NCHW gives strides (CHW, HW, 1),
    channels_last (HWC, 1, C)); any size may be 0 or 1. ``hist``: contiguous int64 ``[C, bins]``,
    ``bins`` 4 (ON, OFF, ZERO, SAT) or 5 (+ NONFINITE), same device. ``upper``: float or None
    (None: SAT stays untouched). Counting rules in :mod:`nepenthe.ops.reference`. Counts are
    exact; indexing must be 64-bit (tensors may exceed 2^31 elements).
``activation_histogram_(x3, y3, hist, kind, negative_slope, upper)``
    ``y3 = φ(x3)`` and the counts of ``x3`` added into ``hist``, reading ``x3`` once. ``y3`` has
    the shape and dtype of ``x3``, its own arbitrary strides, and may be the very same memory as
    ``x3`` (an inplace activation). ``kind``: int index into ``constants.ACTIVATIONS``;
    ``negative_slope`` is used by leaky_relu only. Compute in fp32 (fp64 for fp64 input).
``masked_sgd_(params, grads, momentum_buffers, masks, lr, momentum, dampening, weight_decay,
nesterov, maximize, first_step)``
    One ``torch.optim.SGD`` step over lists of contiguous tensors (params, grads and buffers of
    one dtype per parameter, all on one device), then masked entries of the parameter and of its
    buffer set to exactly 0. ``momentum_buffers`` is empty when ``momentum == 0``; on
    ``first_step`` buffer = gradient (torch's rule). ``masks``: contiguous bool tensors shaped
    like the parameter, or None (no mask); a backend whose row in ``TABLE`` says
    ``packed_masks=True`` also takes bit-packed ``uint8`` masks (:mod:`nepenthe.ops.mask_bits`),
    the others get them unpacked. Multi-tensor: few launches for many parameters.
``masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks, lr, beta1, beta2,
eps, weight_decay, step, amsgrad, maximize)``
    One ``torch.optim.AdamW`` step at step count ``step`` (≥ 1, already incremented), then masked
    entries of the parameter and of every moment set to exactly 0. ``max_exp_avg_sqs`` is empty
    unless ``amsgrad``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..errors import BackendUnavailable
from . import reference
from .constants import KERNEL_DTYPES

__all__ = ["BACKENDS", "ENV_VAR", "EXTENSION_OPS", "KERNEL_DTYPES", "PREFERENCE", "TABLE", "Backend",
           "available_backends", "load", "requested_backend", "reset_cache", "select", "use_backend"]

log = logging.getLogger("nepenthe.ops")

BACKENDS = ("cuda", "triton", "cpp", "torch")  # the rows of TABLE (below, after the loaders)
PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}  # automatic choice, by device type

ENV_VAR = "NEPENTHE_BACKEND"



@dataclass
class _Loaded:
    impl: object | None
    reason: str | None  # why impl is None


_loaded: dict[str, _Loaded] = {}
_warned: set[str] = set()
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("nepenthe_backend", default=None)


# ----- loading -----------------------------------------------------------------------------------------
def _load_extension():
    """``nepenthe._C`` or raise ImportError with a message that says how to fix it."""
    try:
        _C = importlib.import_module("nepenthe._C")  # registers torch.ops.nepenthe_ext.*
    except ImportError as exc:
        raise ImportError(
            f"the compiled extension nepenthe._C is not available ({exc}). Build it against the installed torch: "
            "pip install --no-build-isolation -e . (without NEPENTHE_NO_EXT=1)") from exc
    return _C


EXTENSION_OPS = ("sign_histogram_", "activation_histogram_", "masked_sgd_", "masked_adamw_")


def _require_kernels(dispatch_key: str) -> None:
    """ImportError unless ``nepenthe._C`` registered every op for ``dispatch_key`` (a partial or stale
    build would otherwise fail later, in the middle of a run)."""
    missing = [op for op in EXTENSION_OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"nepenthe_ext::{op}", dispatch_key)]
    if missing:
        raise ImportError(f"nepenthe._C has no {dispatch_key} kernel for {missing} (a stale or partial build); "
                          "rebuild it: pip install --no-build-isolation --force-reinstall -e .")


def _load_cpp():
    _load_extension()
    _require_kernels("CPU")
    from . import extension
    return extension


def _load_cuda():
    _C = _load_extension()
    built = _C.cuda_version()
    if not built:
        raise ImportError("nepenthe._C was built without CUDA kernels (CPU-only torch, no CUDA_HOME, or "
                          "NEPENTHE_NO_CUDA=1); rebuild on a machine with a CUDA build of torch")
    if not torch.cuda.is_available():
        raise ImportError("no CUDA device is available")
    ext_major, torch_cuda = built // 1000, torch.version.cuda or ""
    if not torch_cuda or int(torch_cuda.split(".")[0]) != ext_major:
        raise ImportError(
            f"nepenthe._C was built with CUDA {ext_major}.{built % 1000 // 10} but torch uses CUDA "
            f"{torch_cuda or 'none'}; "
            "rebuild the extension against this torch: pip install --no-build-isolation --force-reinstall -e .")
    _require_kernels("CUDA")
    from . import extension
    return extension


def _load_triton():
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        raise ImportError("Triton kernels need a CUDA device (or TRITON_INTERPRET=1 to run them on the CPU "
                          "through the interpreter, for testing)")
    try:
        kernels = importlib.import_module("nepenthe.kernels")  # imports triton
    except ImportError as exc:
        raise ImportError(f"Triton is not importable ({exc}); pip install triton") from exc
    if not getattr(kernels, "AVAILABLE", False):
        raise ImportError(getattr(kernels, "UNAVAILABLE_REASON", "the Triton kernels did not load"))
    return kernels


@dataclass(frozen=True)
class Backend:
    """A backend as data: its name, the device types it runs on (None: any), the dtypes it has kernels
    for (None: any), how it is loaded (returns the implementation or raises ImportError) and whether
    its masked optimizer steps read bit-packed masks themselves."""

    name: str
    devices: tuple[str, ...] | None
    dtypes: tuple[torch.dtype, ...] | None
    loader: Callable[[], object]
    packed_masks: bool = False

    def runs_on(self, device: torch.device) -> bool:
        if self.name == "triton" and device.type == "cpu":  # Triton's interpreter runs CPU tensors (tests)
            return os.environ.get("TRITON_INTERPRET") == "1"
        return self.devices is None or device.type in self.devices

    def has_kernels_for(self, dtypes: tuple[torch.dtype, ...]) -> bool:
        return self.dtypes is None or all(d in self.dtypes for d in dtypes)


TABLE: dict[str, Backend] = {b.name: b for b in (
    Backend("cuda", ("cuda",), KERNEL_DTYPES, _load_cuda, packed_masks=True),
    Backend("triton", ("cuda",), KERNEL_DTYPES, _load_triton, packed_masks=True),
    Backend("cpp", ("cpu",), KERNEL_DTYPES, _load_cpp, packed_masks=True),
    Backend("torch", None, None, lambda: reference, packed_masks=True),
)}


def load(name: str) -> object:
    """The backend's implementation; :class:`BackendUnavailable` (saying why) when it cannot load."""
    if name not in TABLE:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    if name not in _loaded:
        try:
            _loaded[name] = _Loaded(TABLE[name].loader(), None)
        except Exception as exc:  # a broken .so or a missing package must never break `import nepenthe`
            _loaded[name] = _Loaded(None, str(exc))
    entry = _loaded[name]
    if entry.impl is None:
        raise BackendUnavailable(f"nepenthe backend {name!r} is not available: {entry.reason}")
    return entry.impl


def available_backends() -> dict[str, str | None]:
    """Backend name -> None when it loads here, else the reason it does not."""
    out = {}
    for name in BACKENDS:
        try:
            load(name)
            out[name] = None
        except BackendUnavailable as exc:
            out[name] = str(exc)
    return out


# ----- selection ---------------------------------------------------------------------------------------
def requested_backend() -> str | None:
    """The backend the user asked for (context manager first, then NEPENTHE_BACKEND), or None."""
    name = _override.get() or os.environ.get(ENV_VAR) or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not a backend; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (None: automatic choice)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def select(op: str, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> tuple[str, object]:
    """(name, implementation) of the backend that runs ``op`` on tensors of ``device``/``dtypes``."""
    requested = requested_backend()
    if requested is not None:
        impl = load(requested)
        if not TABLE[requested].runs_on(device):
            raise BackendUnavailable(f"backend {requested!r} was requested for {op} but cannot run on {device} "
                                     f"tensors; unset {ENV_VAR} / use_backend or move the tensors")
        if not TABLE[requested].has_kernels_for(dtypes):
            raise BackendUnavailable(f"backend {requested!r} was requested for {op} but has no kernel for "
                                     f"{[str(d) for d in dtypes]}; supported: fp32, fp16, bf16, fp64")
        return requested, impl
    for name in PREFERENCE.get(device.type, ("torch",)):
        if not TABLE[name].has_kernels_for(dtypes):
            continue
        try:
            return name, load(name)
        except BackendUnavailable as exc:
            if name not in _warned and not (name == "cpp" and os.environ.get("NEPENTHE_NO_EXT") == "1"):
                _warned.add(name)
                log.warning("%s; falling back to the next backend", exc)
                warnings.warn(f"{exc}; falling back to the next backend", RuntimeWarning, stacklevel=4)
    return "torch", reference


def reset_cache() -> None:
    """Forget loaded backends and warnings (tests; after building the extension in-process)."""
    _loaded.clear()
    _warned.clear()
