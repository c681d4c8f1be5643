"""Which ops are rectifiers, and how each behaves in each sign region.

A rectifier is recognised either as a module (``nn.ReLU()``, possibly inplace or reused at several
call sites) or as a functional call in a torch.fx graph (``F.relu(x)``, ``torch.relu``,
``x.relu()``, ...). Both routes produce the same :class:`Rectifier` description, which the
statistics layer uses for the SAT kink and the folding layer for the affine map of each region.

Modules from other libraries are recognised by what they compute, not by class name: a module
without children, parameters or buffers whose class is not from ``torch.nn`` (Hugging Face's
``GELUActivation`` / ``NewGELUActivation`` / ``SiLUActivation``, timm's, a user's ``Swish``) is run
once on a probe vector and matched against each rectifier (:func:`rectifier_of_module`); classes
it cannot recognise that way are declared with :func:`register_rectifier`. Such modules stay whole
(leaves) when a model is traced (:func:`nepenthe.graph.trace`).
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ADD_FUNCTIONS", "BATCHNORM_MODULES", "LINEAR_MODULES", "PASS_THROUGH_MODULES", "call_is_inplace",
           "fused_kind", "Rectifier", "is_foreign_rectifier", "rectifier_of_call", "rectifier_of_module",
           "register_rectifier"]


@dataclass(frozen=True)
class Rectifier:
    """One rectifier's behaviour.

    ``kind``       relu | relu6 | leaky_relu | gelu | silu | hardswish
    ``upper``      upper kink (SAT state) or None
    ``off_slope``  slope for z < 0 where φ is exactly linear there (0 for ReLU, α for LeakyReLU)
    ``exact``      φ is exactly affine on every region (OFF, ON below the kink, SAT); GELU, SiLU
                   and Hardswish are only approximately so and are linearized only on request.
    """

    kind: str
    upper: float | None = None
    off_slope: float = 0.0
    exact: bool = True
    approximate: str = "none"  # GELU's approximation flag, kept to rebuild the op

    def region_affine(self) -> dict[str, tuple[float, float]]:
        """(slope, offset) of φ in each region: OFF (z<0), ON (linear part), SAT (z>=upper)."""
        regions = {"off": (self.off_slope, 0.0), "on": (1.0, 0.0)}
        if self.upper is not None:
            regions["sat"] = (0.0, float(self.upper))
        return regions

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """φ(z), used to evaluate constant channels when folding."""
        if self.kind == "relu":
            return F.relu(z)
        if self.kind == "relu6":
            return F.relu6(z)
        if self.kind == "leaky_relu":
            return F.leaky_relu(z, self.off_slope)
        if self.kind == "gelu":
            return F.gelu(z, approximate=self.approximate)
        if self.kind == "silu":
            return F.silu(z)
        if self.kind == "hardswish":
            return F.hardswish(z)
        raise AssertionError(self.kind)


_REGISTERED: dict[type, Callable[[nn.Module], Rectifier | None]] = {}
_RECOGNISED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> Rectifier | None


def register_rectifier(cls: type, rectifier: Rectifier | Callable[[nn.Module], Rectifier | None]) -> None:
    """Declare that modules of class ``cls`` compute ``rectifier`` (a :class:`Rectifier`, or a function
    of the module returning one, or None for "not a rectifier"), for activation classes that the
    probe of :func:`rectifier_of_module` cannot recognise (parameters, a shape the probe does not fit)
    or should not run. Subclasses are covered too."""
    _REGISTERED[cls] = rectifier if callable(rectifier) and not isinstance(rectifier, Rectifier) else (
        lambda module, r=rectifier: r)
    _RECOGNISED.clear()


# (Rectifier, reference function) in the order they are tried on the probe
_CANDIDATES = (
    (Rectifier("relu"), F.relu),
    (Rectifier("relu6", upper=6.0), F.relu6),
    (Rectifier("gelu", exact=False), F.gelu),
    (Rectifier("gelu", exact=False, approximate="tanh"), lambda x: F.gelu(x, approximate="tanh")),
    (Rectifier("silu", exact=False), F.silu),
    (Rectifier("hardswish", exact=False), F.hardswish),
)


def _probe(module: nn.Module) -> Rectifier | None:
    """The rectifier ``module`` computes, matched on a probe vector over [-8, 8] (``gelu`` and its
    tanh form differ by up to 2e-4 there, so the 1e-5 tolerance tells them apart); None when it
    matches none or does not run on a 1-d float tensor."""
    x = torch.linspace(-8.0, 8.0, 2001)
    try:
        with torch.no_grad():
            y = module(x.clone())  # a clone: an inplace activation must not change the probe
    except Exception:  # noqa: BLE001 - not an elementwise activation of one tensor
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or not y.is_floating_point():
        return None
    y = y.float()
    for rect, fn in _CANDIDATES:
        if torch.allclose(y, fn(x), rtol=1e-4, atol=1e-5):
            return rect
    slope = float(y[0] / x[0])  # leaky ReLU: identity above 0, one slope below
    if 0.0 < slope < 1.0 and math.isfinite(slope) and torch.allclose(y, F.leaky_relu(x, slope), rtol=1e-4, atol=1e-6):
        return Rectifier("leaky_relu", off_slope=slope)
    return None


def _fx_tracing() -> bool:
    trace_state = torch.fx._symbolic_trace
    check = getattr(trace_state, "is_fx_symbolic_tracing", None) or trace_state.is_fx_tracing
    return bool(check())


def is_foreign_rectifier(module: nn.Module) -> bool:
    """A rectifier module whose class is not one of ``torch.nn``'s (registered or recognised by
    probing): tracing keeps it whole, as a leaf."""
    return not type(module).__module__.startswith("torch.") and rectifier_of_module(module) is not None


def rectifier_of_module(module: nn.Module) -> Rectifier | None:
    """The Rectifier a module computes, or None when it is not one we measure: ``torch.nn``'s
    activation classes by type, registered classes (:func:`register_rectifier`), then any other
    module without children, parameters or buffers by what it computes on a probe (see :func:`_probe`)."""
    # ReLU6 subclasses Hardtanh, so it must be checked by exact type before any Hardtanh rule.
    if isinstance(module, nn.ReLU6):
        return Rectifier("relu6", upper=6.0)
    if isinstance(module, nn.ReLU):
        return Rectifier("relu")
    if isinstance(module, nn.LeakyReLU):
        return Rectifier("leaky_relu", off_slope=float(module.negative_slope))
    if isinstance(module, nn.GELU):
        return Rectifier("gelu", exact=False, approximate=module.approximate)
    if isinstance(module, nn.SiLU):
        return Rectifier("silu", exact=False)
    if isinstance(module, nn.Hardswish):
        return Rectifier("hardswish", exact=False)
    for cls, describe in _REGISTERED.items():
        if isinstance(module, cls):
            return describe(module)
    if type(module).__module__.startswith("torch."):  # torch's own modules: only the types above
        return None
    try:
        return _RECOGNISED[module]
    except KeyError:
        pass
    if _fx_tracing():  # a probe now would be recorded into the graph
        return None  # (nepenthe.graph.trace probes every module before it traces)
    # only childless modules: a wrapper holding an nn.ReLU is traced into, and its child is the site
    plain = (next(module.children(), None) is None and next(module.parameters(), None) is None
             and next(module.buffers(), None) is None)
    found = _probe(module) if plain else None
    _RECOGNISED[module] = found
    return found


def _arg(args: tuple, kwargs: dict, index: int, name: str, default):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
    F.relu6: "relu6", F.leaky_relu: "leaky_relu", F.leaky_relu_: "leaky_relu",
    F.gelu: "gelu", F.silu: "silu", F.hardswish: "hardswish",
}
_METHODS = {"relu": "relu", "relu_": "relu"}


def rectifier_of_call(op: str, target, args: tuple, kwargs: dict) -> Rectifier | None:
    """The Rectifier of an fx ``call_function`` / ``call_method`` node, or None."""
    if op == "call_method":
        kind = _METHODS.get(target)
    elif op == "call_function":
        try:
            kind = _FUNCTIONS.get(target)
        except TypeError:  # unhashable targets cannot be rectifiers
            kind = None
    else:
        kind = None
    if kind is None:
        return None
    if kind == "relu6":
        return Rectifier("relu6", upper=6.0)
    if kind == "leaky_relu":
        slope = _arg(args, kwargs, 1, "negative_slope", 0.01)
        return Rectifier("leaky_relu", off_slope=float(slope)) if isinstance(slope, (int, float)) else None
    if kind == "gelu":
        return Rectifier("gelu", exact=False, approximate=str(_arg(args, kwargs, 1, "approximate", "none")))
    if kind in ("silu", "hardswish"):
        return Rectifier(kind, exact=False)
    return Rectifier("relu")


def fused_kind(rect: Rectifier) -> str | None:
    """The kind of :func:`nepenthe.ops.activation_histogram` that computes this rectifier, if any."""
    if rect.kind == "gelu":
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(rect.approximate)
    return rect.kind if rect.kind in ("relu", "relu6", "leaky_relu", "silu", "hardswish") else None


_INPLACE_FUNCTIONS = (torch.relu_, F.relu_, F.leaky_relu_)


def call_is_inplace(op: str, target, args: tuple, kwargs: dict, module: nn.Module | None = None) -> bool:
    """Whether a rectifier call overwrites its input (``nn.ReLU(inplace=True)``, ``x.relu_()``, ...)."""
    if op == "call_module":
        return getattr(module, "inplace", False) is True
    if op == "call_method":
        return str(target).endswith("_")
    if any(target is f for f in _INPLACE_FUNCTIONS):
        return True
    return _arg(args, kwargs, 2 if target is F.leaky_relu else 1, "inplace", False) is True


# Ops that only move data around or act elementwise with f(0) = 0; used to walk from an
# activation back to the linear op that produces its input.
PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
BATCHNORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
LINEAR_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
