"""Support tier, private: idioms several layers repeat (a call's positional inputs, the first tensor
of a model's output, replacing a submodule by its dotted path)."""

from __future__ import annotations

import torch
import torch.nn as nn


def as_args(inputs) -> tuple:
    """Positional model inputs: a tuple as it is, anything else as a 1-tuple."""
    return inputs if isinstance(inputs, tuple) else (inputs,)


def first_tensor(out) -> torch.Tensor:
    """The first tensor of a model's output (a tensor, or nested tuples / lists / dicts of them);
    TypeError when there is none."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return first_tensor(out[0])
    if isinstance(out, dict) and out:
        return first_tensor(next(iter(out.values())))
    raise TypeError(f"cannot compare model outputs of type {type(out).__name__}: no tensor in it")


def get_parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(the module holding the submodule at dotted ``path``, the submodule's attribute name)."""
    parent_name, _, child = path.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at dotted ``path`` under ``root``; returns the module that was there."""
    parent, child = get_parent(root, path)
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def changed_settings(old: dict | None, new: dict, most: int = 6) -> str:
    """``"key.path: old -> new; ..."`` for the (nested) settings that differ, at most ``most`` of them
    (for the message refusing to resume a folder made with other settings)."""
    before, after = _flat(old or {}), _flat(new)
    changed = [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
               if before.get(k) != after.get(k)]
    return "; ".join(changed[:most]) + ("; ..." if len(changed) > most else "") if changed else "unreadable"
