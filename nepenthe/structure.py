"""Support tier: a cheap fingerprint of what a torch.fx trace of a module depends on.

Tracing a model (and rewriting the graph) costs milliseconds to tens of milliseconds, which is
more than a batch-1 forward of a small network. Callers that trace the same model again and again
(``measure`` in every pruning iteration) keep the graph and reuse it while the model's
:func:`structure_key` is unchanged.

A trace depends on the module tree, the objects it holds (submodules, parameters and buffers as
objects, hooks, instance-level overrides such as ``module.forward = ...``) and the plain Python
attributes its forward reads (``inplace``, ``stride``, flags). It does not depend on tensor
*values*: weights updated in place, masks applied, BatchNorm statistics all keep the key.
Objects are compared by identity; a weak reference to each (or a strong one when weak ones are
not supported) guarantees that an id in the key still belongs to the same object, so a new module
that happens to reuse a freed module's address never matches.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn as nn

__all__ = ["structure_key", "StructureKey"]

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.memory_format)
_PLAIN_TYPES = frozenset(_PLAIN)
_MAPPINGS = frozenset((dict, OrderedDict))
_SEQUENCES = frozenset((tuple, list))
_MAX_ITEMS = 64  # longer containers are keyed by identity (a forward rarely reads such lists element-wise)


@dataclass
class StructureKey:
    key: tuple
    refs: list = field(default_factory=list, repr=False, compare=False)  # weak refs to the keyed objects
    pins: list = field(default_factory=list, repr=False, compare=False)  # objects that take no weak refs

    def alive(self) -> bool:
        return all(ref() is not None for ref in self.refs)

    def matches(self, other: StructureKey | None) -> bool:
        """Same structure: equal keys, and every object the key names by identity still alive."""
        return other is not None and self.key == other.key and self.alive() and other.alive()


class _Builder:
    def __init__(self, root: nn.Module):
        self.root = root
        self.refs: list = []
        self.pins: list = []

    def ident(self, obj) -> tuple:
        try:
            self.refs.append(weakref.ref(obj))
        except TypeError:
            if obj is not self.root:  # never pin the model itself (a cache keyed on it must let it die)
                self.pins.append(obj)
        return ("id", id(obj))

    def value(self, v) -> object:
        t = type(v)
        if t in _PLAIN_TYPES:  # exact types first: this runs for every attribute of every module
            return v
        if t in _MAPPINGS:
            if not v:  # most of them: a module's empty hook dicts
                return ()
            if len(v) <= _MAX_ITEMS:
                return ("dict", tuple((self.value(k), self.value(e)) for k, e in v.items()))
        elif t in _SEQUENCES:
            if len(v) <= _MAX_ITEMS:
                return (t, tuple(self.value(e) for e in v))
        elif isinstance(v, _PLAIN):
            return v
        return self.ident(v)


def structure_key(model: nn.Module) -> StructureKey:
    """The fingerprint of ``model``'s structure (see the module docstring); a few µs per module."""
    b = _Builder(model)
    parts = []
    for name, module in model.named_modules(remove_duplicate=False):
        attrs = []
        for attr, v in module.__dict__.items():
            if attr in ("_parameters", "_buffers", "_modules"):  # may be long: identities only
                attrs.append((attr, tuple((k, None if t is None else b.ident(t)) for k, t in v.items())))
            else:
                attrs.append((attr, b.value(v)))
        parts.append((name, b.ident(module), type(module), tuple(attrs)))
    return StructureKey(tuple(parts), b.refs, b.pins)
