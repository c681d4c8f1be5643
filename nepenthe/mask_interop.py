"""Models as users bring them: wrapped (``torch.compile``, DDP, DataParallel) or carrying another
library's pruning reparametrization (``torch.nn.utils.prune``, ``torch.ao.pruning`` /
``torch.nn.utils.parametrize``).

nepenthe keeps a mask as a bool buffer ``<param>_mask`` (or a packed ``<param>_mask_bits``) next to an
unrenamed parameter (:mod:`nepenthe.masks`). ``torch.nn.utils.prune`` renames the parameter to ``<param>_orig``, keeps a
*float* ``<param>_mask`` buffer of the same name and recomputes the weight in a forward pre-hook;
read as ours, its mask would be wrong. So the entry points refuse such a model with an error that
names the modules and the fix (:func:`refuse_foreign_pruning`); :func:`adopt_torch_prune` converts
it, and :func:`export_torch_prune` hands our masks to ``torch.nn.utils.prune``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from .errors import ForeignPruningError
from .masks import MASK_SUFFIX, get_mask, masked_parameters, remove_mask, set_mask

__all__ = ["ForeignPruningError", "adopt_torch_prune", "export_torch_prune", "foreign_pruning",
           "refuse_foreign_pruning", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module a wrapper runs: ``torch.compile``'s ``OptimizedModule`` (its ``_orig_mod``),
    ``DistributedDataParallel`` / ``DataParallel`` (their ``module``), nested wrappers too, so that
    site names, masks and the fold see the user's own module paths (no ``_orig_mod.`` prefix)."""
    while True:
        if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # (by name: importing torch._dynamo to check the class costs a second)
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def _torch_prune_hooks(module: nn.Module) -> list[str]:
    return [hook._tensor_name for hook in module._forward_pre_hooks.values()
            if isinstance(hook, torch_prune.BasePruningMethod)]


def foreign_pruning(model: nn.Module) -> dict[str, list[str]]:
    """``{"module.path": ["torch.nn.utils.prune on weight", ...]}`` for every module carrying a
    reparametrization nepenthe does not read (empty when there is none)."""
    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        kinds = [f"torch.nn.utils.prune on {t}" for t in _torch_prune_hooks(module)]
        if parametrize.is_parametrized(module):
            kinds += [f"a parametrization (torch.ao.pruning / torch.nn.utils.parametrize) on {t}"
                      for t in module.parametrizations.keys()]
        if kinds:
            found[name or "(the model)"] = kinds
    return found


def refuse_foreign_pruning(model: nn.Module, what: str) -> None:
    """:class:`ForeignPruningError` naming each module and the way out, when ``model`` carries a
    reparametrization nepenthe would misread (``what``: the entry point, for the message)."""
    found = foreign_pruning(model)
    if not found:
        return
    listed = "; ".join(f"{name}: {', '.join(kinds)}" for name, kinds in list(found.items())[:4])
    more = f" (and {len(found) - 4} more modules)" if len(found) > 4 else ""
    raise ForeignPruningError(
        f"{what}: the model carries another pruning library's reparametrization ({listed}{more}). "
        "For torch.nn.utils.prune, convert it with nepenthe.mask_interop.adopt_torch_prune(model) (its masks "
        "become nepenthe's) or make it permanent with torch.nn.utils.prune.remove(module, name); for "
        "parametrizations, call the sparsifier's squash_mask() or "
        "torch.nn.utils.parametrize.remove_parametrizations(module, name) first.")


@torch.no_grad()
def adopt_torch_prune(model: nn.Module) -> list[str]:
    """Convert every ``torch.nn.utils.prune`` reparametrization into nepenthe's masks, in place: the
    weight becomes ``weight_orig * mask`` as a plain parameter again and the mask a bool buffer
    (True = kept). Returns the converted ``module.param`` names."""
    converted = []
    for name, module in model.named_modules():
        for tensor_name in _torch_prune_hooks(module):
            keep = getattr(module, tensor_name + MASK_SUFFIX) != 0
            torch_prune.remove(module, tensor_name)  # weight = weight_orig * mask, hooks and buffers gone
            set_mask(module, keep, tensor_name)
            converted.append(f"{name}.{tensor_name}" if name else tensor_name)
    return converted


@torch.no_grad()
def export_torch_prune(model: nn.Module) -> list[str]:
    """Hand nepenthe's masks to ``torch.nn.utils.prune``, in place (``custom_from_mask``: the
    parameter becomes ``<param>_orig`` and the mask a float buffer, re-applied in a forward
    pre-hook), for tools that read that format. Returns the converted ``module.param`` names."""
    converted = []
    names = {id(m): n for n, m in model.named_modules()}
    for module, param_name, _ in masked_parameters(model):
        keep = get_mask(module, param_name)  # bool, whether stored as bool or packed
        remove_mask(module, param_name)
        torch_prune.custom_from_mask(module, param_name, keep)
        name = names.get(id(module), "")
        converted.append(f"{name}.{param_name}" if name else param_name)
    return converted
