"""Which ops are rectifiers, and how each behaves in each sign region.

A rectifier is recognised either as a module (``nn.ReLU()``, possibly inplace or reused at several
call sites) or as a functional call in a torch.fx graph (``F.relu(x)``, ``torch.relu``,
``x.relu()``, ...). Both routes produce the same :class:`Rectifier` description, which the
statistics layer uses for the SAT kink and the folding layer for the affine map of each region.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ADD_FUNCTIONS", "BATCHNORM_MODULES", "LINEAR_MODULES", "PASS_THROUGH_MODULES", "call_is_inplace",
           "fused_kind", "Rectifier", "rectifier_of_call", "rectifier_of_module"]


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


def rectifier_of_module(module: nn.Module) -> Rectifier | None:
    """The Rectifier a module computes, or None when it is not one we measure."""
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
    return None


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
