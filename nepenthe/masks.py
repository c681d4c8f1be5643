"""Pruning masks stored on the model itself.

A masked parameter ``<module>.weight`` gets a bool buffer ``<module>.weight_mask`` (True = kept).
Unlike ``torch.nn.utils.prune`` nothing is renamed and no forward hook is added: the weight itself
holds zeros at masked positions, and the mask is re-applied after every optimizer step. So a
pruned model's ``state_dict`` has the original keys plus ``*.weight_mask``, loads into the same
architecture (after :func:`restore_masks` on a fresh instance), and runs at full speed without
nepenthe installed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn as nn

__all__ = ["MASK_SUFFIX", "get_mask", "get_masks", "mask_buffer_name", "mask_lookup", "masked_modules",
           "masked_parameters", "prunable_modules", "remaining_weights", "remove_masks", "restore_masks", "set_mask",
           "sparsity"]

MASK_SUFFIX = "_mask"


def mask_buffer_name(param_name: str = "weight") -> str:
    return param_name + MASK_SUFFIX


def set_mask(module: nn.Module, mask: torch.Tensor, param_name: str = "weight") -> None:
    """Attach (or replace) the bool mask of ``module.<param_name>`` and zero the masked weights."""
    param = getattr(module, param_name)
    if mask.shape != param.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit {param_name} of shape {tuple(param.shape)}"
                         f" in {type(module).__name__}")
    mask = mask.to(device=param.device, dtype=torch.bool)
    name = mask_buffer_name(param_name)
    if name in module._buffers:
        module._buffers[name] = mask
    else:
        module.register_buffer(name, mask)
    with torch.no_grad():
        param.mul_(mask.to(param.dtype))


def get_mask(module: nn.Module, param_name: str = "weight") -> torch.Tensor | None:
    return module._buffers.get(mask_buffer_name(param_name))


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module for every module carrying a weight mask."""
    return {n: m for n, m in model.named_modules() if get_mask(m) is not None}


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: get_mask(m) for n, m in masked_modules(model).items()}


def masked_parameters(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(module, parameter name, mask) for every ``<param>_mask`` buffer of the model (weights,
    biases, any parameter)."""
    found = []
    for module in model.modules():
        for buffer_name, mask in module._buffers.items():
            param_name = buffer_name[: -len(MASK_SUFFIX)]
            if buffer_name.endswith(MASK_SUFFIX) and isinstance(module._parameters.get(param_name), torch.Tensor):
                found.append((module, param_name, mask))
    return found


def mask_lookup(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """``parameter -> its current mask buffer (or None)`` for the fused optimizers' ``masks=``.

    The lookup goes by (module, parameter name) at every call, so masks attached or replaced
    after the optimizer was built (a new pruning round) are used from the next step on.
    """
    owners = {}
    for module in model.modules():
        for param_name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), (module, mask_buffer_name(param_name)))

    def lookup(param: torch.Tensor) -> torch.Tensor | None:
        owner = owners.get(id(param))
        return None if owner is None else owner[0]._buffers.get(owner[1])
    return lookup


def restore_masks(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Create the mask buffers a state_dict holds, so ``model.load_state_dict`` accepts it.

    A freshly constructed model has no ``*.weight_mask`` buffers; call this first, then
    ``model.load_state_dict(state_dict)``.
    """
    modules = dict(model.named_modules())
    for key, value in state_dict.items():
        if not key.endswith(MASK_SUFFIX):
            continue
        owner, _, buffer = key.rpartition(".")
        param_name = buffer[: -len(MASK_SUFFIX)]
        module = modules.get(owner)
        if module is None or not isinstance(getattr(module, param_name, None), torch.Tensor):
            raise KeyError(f"state_dict has mask {key!r} but the model has no parameter {owner}.{param_name}")
        set_mask(module, value.to(torch.bool), param_name)
    return model


def remove_masks(model: nn.Module) -> nn.Module:
    """Drop every mask buffer (the zeros stay in the parameters)."""
    for module, param_name, _ in masked_parameters(model):
        del module._buffers[mask_buffer_name(param_name)]
    return model


def prunable_modules(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None,
                     types: Iterable[type] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) -> dict[str, nn.Module]:
    """Every Conv/Linear of ``model`` accepted by ``filter_fn(module, fqn)``."""
    types = tuple(types)
    return {n: m for n, m in model.named_modules()
            if isinstance(m, types) and (filter_fn is None or filter_fn(m, n))}


def sparsity(modules: Mapping[str, nn.Module]) -> tuple[float, dict[str, float]]:
    """(overall fraction of masked weights, per-layer fraction) over the given modules."""
    per_layer, masked, total = {}, 0, 0
    for name, module in modules.items():
        mask = get_mask(module)
        n = module.weight.numel()
        m = 0 if mask is None else n - int(mask.sum())
        per_layer[name] = m / n if n else 0.0
        masked, total = masked + m, total + n
    return (masked / total if total else 0.0), per_layer


def remaining_weights(module: nn.Module) -> int:
    mask = get_mask(module)
    return module.weight.numel() if mask is None else int(mask.sum())
