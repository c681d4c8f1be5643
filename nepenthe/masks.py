"""Pruning masks stored on the model itself.

A masked parameter ``<module>.weight`` gets a bool buffer ``<module>.weight_mask`` (True = kept).
Unlike ``torch.nn.utils.prune`` nothing is renamed and no forward hook is added: the weight itself
holds zeros at masked positions, and the mask is re-applied after every optimizer step. So a
pruned model's ``state_dict`` has the original keys plus ``*.weight_mask``, loads into the same
architecture (after :func:`restore_masks` on a fresh instance), and runs at full speed without
nepenthe installed.

**Packed storage** (opt in: ``set_mask(..., packed=True)``, :func:`pack_masks_` for a whole model,
``PruneConfig(pack_masks=True)`` in the loop): the mask is a ``uint8`` buffer ``<param>_mask_bits``
of ``ceil(numel / 8)`` bytes instead, bit ``i % 8`` (least significant first) of byte ``i // 8``
being element ``i`` of the parameter in row-major order (``numpy.packbits(..., bitorder="little")``),
so 0.125 byte per weight instead of 1. A parameter has one form or the other, never both; its
state_dict key says which. :func:`get_mask` returns a bool tensor either way (unpacked on demand,
one layer at a time), so code that reads masks needs no change; :func:`stored_mask` returns the
buffer as stored, which the fused masked optimizers read directly.

**FSDP2** (``fully_shard``, any mesh): a bool mask is a ``DTensor`` sharded as its parameter. A packed
one holds the bits of each rank's own slice of the parameter (``to_local()``, row-major), so each rank
stores 1/8 byte per local weight and enforcing it is local; the buffer is a ``uint8`` ``DTensor`` with
one row per slice (:mod:`nepenthe.packed`), so ``model.state_dict()`` and
``torch.distributed.checkpoint`` keep every rank's bits. :func:`stored_mask` gives this rank's bits,
:func:`get_mask` them unpacked as a bool ``DTensor`` (this layer's slice only), :func:`full_mask` the
whole layer's mask. Checkpoints hold the whole tensor's packed bits (``nepenthe.sharded.full_state_dict``
gathers them one layer at a time: :func:`whole_packed_masks`), the file of a one-process run;
:func:`restore_masks` and ``load_state_dict`` cut each rank's slice out of them locally.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn as nn
from torch import Tensor

from .packed import (
    checked_slice_bits,
    count_kept_bits,
    pack_mask,
    packed_mask_bytes,
    per_slice_bits,
    slice_bits,
    unpack_mask,
)
from .sharded import from_local_like, full, is_sharded, local, reshard, shard_like, sharded_sum

__all__ = ["MASK_SUFFIX", "PACKED_SUFFIX", "full_mask", "get_mask", "get_masks", "has_mask", "is_mask_key",
           "mask_buffer_name", "mask_lookup", "masked_modules", "masked_parameters", "pack_mask", "pack_masks_",
           "packed_mask_bytes", "prunable_modules", "remaining_weights", "remove_mask", "remove_masks", "restore_masks",
           "set_mask", "shard_packed_mask", "sparsity", "stored_mask", "unpack_mask", "unpack_masks_",
           "whole_packed_masks"]

MASK_SUFFIX = "_mask"
PACKED_SUFFIX = "_mask_bits"

# ----- one parameter -------------------------------------------------------------------------------------
_SHARDS = "_nepenthe_packed_shards"  # module attribute: parameter name -> the DTensor its packed slice covers


def _packed_shard(module: nn.Module, param_name: str) -> Tensor | None:
    """The sharded parameter whose local slice the packed mask of ``module.<param_name>`` holds (None:
    whole). Recorded when stored: after a forward FSDP2 leaves the root's parameters gathered."""
    return module.__dict__.get(_SHARDS, {}).get(param_name)


def mask_buffer_name(param_name: str = "weight", packed: bool = False) -> str:
    return param_name + (PACKED_SUFFIX if packed else MASK_SUFFIX)


def is_mask_key(key: str) -> bool:
    """Whether a buffer name / state_dict key is a nepenthe mask (bool ``*_mask`` or packed ``*_mask_bits``)."""
    return key.endswith(MASK_SUFFIX) or key.endswith(PACKED_SUFFIX)


def _layer(module: nn.Module, param_name: str, where: str | None) -> str:
    return where or f"{type(module).__name__}.{param_name}"


def _checked_bits(bits, param: Tensor, where: str) -> Tensor:
    """``bits`` when it is a valid packed mask of ``param`` (untrusted: a state_dict), else ValueError."""
    want = packed_mask_bytes(param.numel())  # a sharded parameter's local slice, or a whole tensor
    if not isinstance(bits, Tensor) or bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != want \
            or bits.is_sparse:
        got = f"{bits.dtype}{list(bits.shape)}" if isinstance(bits, Tensor) else type(bits).__name__
        raise ValueError(f"{where}: a packed mask of a parameter of shape {tuple(param.shape)} ({param.numel()} "
                         f"elements) must be a dense uint8[{want}] tensor (nepenthe.masks.pack_mask), got {got}; "
                         "the state_dict does not belong to this model or is damaged")
    return bits


def _check_packed_load(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs) -> None:
    """load_state_dict pre-hook of a module holding packed masks: torch checks a buffer's shape but
    casts any dtype into it, so a float or int tensor of the right length would be read as bits."""
    for name, buf in module._buffers.items():
        if buf is None or not name.endswith(PACKED_SUFFIX) or prefix + name not in state_dict:
            continue
        value = state_dict[prefix + name]
        if not isinstance(value, Tensor) or value.dtype != torch.uint8:
            got = value.dtype if isinstance(value, Tensor) else type(value).__name__
            error_msgs.append(f"{prefix}{name}: a packed mask must be uint8 (1 bit per weight), got {got}")
            continue
        shard = _packed_shard(module, name[: -len(PACKED_SUFFIX)])
        if shard is not None:  # FSDP2 (state_dict: load_state_dict's own copy): whole bits cut to this rank's
            try:
                if is_sharded(value):
                    checked_slice_bits(value, shard, prefix + name)
                else:
                    state_dict[prefix + name] = shard_packed_mask(_checked_bits(value, shard, prefix + name), shard)
            except ValueError as e:
                error_msgs.append(str(e))
    for name, buf in module._buffers.items():  # the other form in the state_dict: say how to load it
        if buf is not None and name.endswith(PACKED_SUFFIX) and strict:
            bool_key = prefix + name[: -len(PACKED_SUFFIX)] + MASK_SUFFIX
            if bool_key in state_dict and prefix + name not in state_dict:
                error_msgs.append(f"{bool_key} is a bool mask but the model stores {prefix}{name} packed: call "
                                  "nepenthe.masks.restore_masks(model, state_dict) before load_state_dict")


def _store(module: nn.Module, param_name: str, tensor: Tensor, packed: bool, shard: Tensor | None = None) -> None:
    """Make ``tensor`` the mask buffer of ``module.<param_name>`` in its form, dropping the other form.
    ``shard``: the sharded parameter whose local slice the packed ``tensor`` covers (recorded)."""
    if packed and shard is not None:  # the bits of this rank's slice, held in the per-slice form
        module.__dict__.setdefault(_SHARDS, {})[param_name] = shard
        tensor = per_slice_bits(tensor, shard)
    else:
        module.__dict__.get(_SHARDS, {}).pop(param_name, None)
    other = mask_buffer_name(param_name, not packed)
    if other in module._buffers:
        del module._buffers[other]
    name = mask_buffer_name(param_name, packed)
    if name in module._buffers:
        module._buffers[name] = tensor
    else:
        module.register_buffer(name, tensor)
    if packed and not any(getattr(h, "hook", h) is _check_packed_load
                          for h in module._load_state_dict_pre_hooks.values()):
        module.register_load_state_dict_pre_hook(_check_packed_load)


def set_mask(module: nn.Module, mask: Tensor, param_name: str = "weight", *, packed: bool | None = None,
             where: str | None = None) -> None:
    """Attach (or replace) the mask of ``module.<param_name>`` (any tensor of the parameter's shape,
    nonzero = keep) and zero the masked weights.

    ``packed``: store it bit-packed (``<param>_mask_bits``, see the module docstring) or as a bool
    buffer (``<param>_mask``); None keeps the form the parameter's mask has now (bool for a first
    mask). ``where`` names the layer in errors (default: the module's class and parameter).
    """
    param = getattr(module, param_name)
    if not isinstance(mask, Tensor) or mask.shape != param.shape:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{_layer(module, param_name, where)}: mask of shape {got} does not fit {param_name} of "
                         f"shape {tuple(param.shape)} in {type(module).__name__}")
    if packed is None:
        packed = mask_buffer_name(param_name, True) in module._buffers
    if is_sharded(param):  # FSDP2: the mask is sharded as its parameter is; zeroing is local
        keep = mask.to(torch.bool) if is_sharded(mask) else shard_like(mask.to(torch.bool), param)
        # packed: each rank packs its own slice (1/8 byte per local weight)
        _store(module, param_name, pack_mask(local(keep)) if packed else keep, packed, param)
        with torch.no_grad():
            _zero_masked(local(param), local(keep))
        return
    keep = mask.to(device=param.device, dtype=torch.bool)
    _store(module, param_name, pack_mask(keep) if packed else keep, packed)
    with torch.no_grad():
        _zero_masked(param, keep)


def _zero_masked(param: Tensor, keep: Tensor) -> None:
    """``param *= keep``. On the CPU a slice at a time: the float copy of the mask a multiply makes would
    otherwise be a whole layer's, and such big short-lived copies leave heap holes no later copy fits
    (up to a float mask of the whole model in resident memory)."""
    if param.device.type != "cpu" or not (param.is_contiguous() and keep.is_contiguous()):
        param.mul_(keep.to(param.dtype))
        return
    flat, bits = param.view(-1), keep.view(-1)
    for start in range(0, flat.numel(), 1 << 18):
        flat[start:start + (1 << 18)].mul_(bits[start:start + (1 << 18)].to(param.dtype))


def _set_bits(module: nn.Module, bits: Tensor, param_name: str, where: str) -> None:
    """Attach an already packed mask (validated) and zero the masked weights. For a sharded parameter
    ``bits`` is the whole tensor's mask (cut to this rank's slice here), or the per-slice form's."""
    param = getattr(module, param_name)
    shard = param if is_sharded(param) else None
    if is_sharded(bits):  # rows of per-rank bits: this rank's, for a parameter sharded the same way only
        if shard is None:  # one rank's bits are not the whole mask
            raise ValueError(f"{where}: a sharded model's packed mask (one row of bits per slice) cannot be "
                             "loaded into a parameter that is not sharded; save the whole mask with "
                             "nepenthe.sharded.full_state_dict")
        bits = checked_slice_bits(bits, param, where)
    elif shard is not None:  # a whole tensor's bits: this rank's slice cut out
        bits = _bits_of_slice(_checked_bits(bits, param, where), param)
    param = local(param)
    bits = _checked_bits(bits, param, where).to(param.device).contiguous()
    _store(module, param_name, bits, True, shard)
    with torch.no_grad():
        _zero_masked(param, unpack_mask(bits, param.shape))


@torch.no_grad()
def shard_packed_mask(bits: Tensor, like: Tensor) -> Tensor:
    """This rank's part of a whole tensor's packed mask ``bits``: the packed mask of its slice of the
    sharded ``like`` (``like.to_local()``) in the per-slice form a sharded model's state_dict holds, cut
    locally (no communication); ``bits`` for a plain ``like``."""
    return per_slice_bits(_bits_of_slice(bits, like), like) if is_sharded(like) else bits


def _bits_of_slice(bits: Tensor, like: Tensor) -> Tensor:
    """The packed mask of this rank's slice of the sharded ``like``, cut out of the whole tensor's ``bits``."""
    return pack_mask(local(shard_like(unpack_mask(bits, like.shape), like)))


def stored_mask(module: nn.Module, param_name: str = "weight") -> Tensor | None:
    """The mask buffer of ``module.<param_name>`` as stored: bool of the parameter's shape, packed
    ``uint8[ceil(numel/8)]``, or None. FSDP2: a bool ``DTensor``, or the packed bits of this rank's slice."""
    found = module._buffers.get(mask_buffer_name(param_name))
    if found is not None:
        return found
    bits = module._buffers.get(mask_buffer_name(param_name, True))
    shard = _packed_shard(module, param_name) if bits is not None else None
    return bits if shard is None else slice_bits(bits, shard)


def has_mask(module: nn.Module, param_name: str = "weight") -> bool:
    return stored_mask(module, param_name) is not None


def get_mask(module: nn.Module, param_name: str = "weight") -> Tensor | None:
    """The bool mask of ``module.<param_name>`` (None: unmasked). For bool storage it is the buffer
    itself; for packed storage an unpacked copy (editing it changes nothing: use :func:`set_mask`)."""
    found = module._buffers.get(mask_buffer_name(param_name))
    if found is not None:
        return found
    bits = stored_mask(module, param_name)
    if bits is None:
        return None
    shard = _packed_shard(module, param_name)
    if shard is not None:  # FSDP2: this rank's slice, as a DTensor sharded as the parameter
        return from_local_like(unpack_mask(bits, local(shard).shape), shard)
    return unpack_mask(bits, getattr(module, param_name).shape)


def full_mask(module: nn.Module, param_name: str = "weight") -> Tensor | None:
    """The mask of the whole ``module.<param_name>`` in its stored form: bool, or packed
    ``uint8[ceil(numel/8)]`` (None: unmasked). For a sharded parameter it is gathered (a collective:
    every rank calls it, in the same order; one layer at a time)."""
    shard = _packed_shard(module, param_name) if has_mask(module, param_name) else None
    if shard is not None:
        return pack_mask(full(get_mask(module, param_name)))
    mask = stored_mask(module, param_name)
    return None if mask is None else full(mask)


# ----- a whole model -------------------------------------------------------------------------------------
def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module for every module carrying a weight mask."""
    return {n: m for n, m in model.named_modules() if has_mask(m)}


def get_masks(model: nn.Module) -> dict[str, Tensor]:
    """Qualified module name -> bool weight mask (packed ones unpacked: a byte per weight for all of them)."""
    return {n: get_mask(m) for n, m in masked_modules(model).items()}


def _mask_param_name(module: nn.Module, buffer_name: str) -> str | None:
    """The parameter a buffer is the mask of, or None when it is no mask buffer of a parameter."""
    for suffix in (PACKED_SUFFIX, MASK_SUFFIX):
        if buffer_name.endswith(suffix):
            param_name = buffer_name[: -len(suffix)]
            if isinstance(module._parameters.get(param_name), Tensor):
                return param_name
    return None


def masked_parameters(model: nn.Module) -> list[tuple[nn.Module, str, Tensor]]:
    """(module, parameter name, mask as stored) for every mask buffer of the model (weights, biases,
    any parameter). The mask is the buffer itself: bool of the parameter's shape, or packed uint8
    (:func:`stored_mask`); ``nepenthe.ops.apply_mask_`` and the masked optimizers take either,
    :func:`get_mask` gives the bool form."""
    found = []
    for module in model.modules():
        for buffer_name, mask in module._buffers.items():
            param_name = _mask_param_name(module, buffer_name) if mask is not None else None
            if param_name is not None:  # FSDP2, packed: this rank's bits
                found.append((module, param_name, stored_mask(module, param_name)))
    return found


def mask_lookup(model: nn.Module) -> Callable[[Tensor], Tensor | None]:
    """``parameter -> its current mask buffer, as stored (or None)`` for the fused optimizers' ``masks=``.

    The lookup goes by (module, parameter name) at every call, so masks attached or replaced
    after the optimizer was built (a new pruning round) are used from the next step on; packed
    ones are handed over packed (the optimizers read the bits).
    """
    owners = {}
    for module in model.modules():
        for param_name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), (module, param_name))

    def lookup(param: Tensor) -> Tensor | None:
        owner = owners.get(id(param))
        return None if owner is None else stored_mask(*owner)
    return lookup


def restore_masks(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Create the mask buffers a state_dict holds, each in the form it is stored in (bool
    ``*_mask`` or packed ``*_mask_bits``), so ``model.load_state_dict`` accepts it.

    A freshly constructed model has no mask buffers; call this first, then
    ``model.load_state_dict(state_dict)``. A mask that does not fit its parameter (shape, or a packed
    one's dtype and length) is refused with ValueError naming its key.

    FSDP2: a packed mask of a sharded parameter is the whole tensor's (a checkpoint's, any number of
    ranks), of which each rank keeps its slice, or the per-slice form a sharded model's
    ``state_dict()`` holds (each rank's own bits; refused when saved on another mesh).
    """
    modules = dict(model.named_modules())
    for key, value in state_dict.items():
        if not is_mask_key(key):
            continue
        packed = key.endswith(PACKED_SUFFIX)
        owner, _, buffer = key.rpartition(".")
        param_name = buffer[: -len(PACKED_SUFFIX if packed else MASK_SUFFIX)]
        module = modules.get(owner)
        if module is None or not isinstance(getattr(module, param_name, None), Tensor):
            raise KeyError(f"state_dict has mask {key!r} but the model has no parameter {owner}.{param_name}")
        twin = (owner + "." if owner else "") + mask_buffer_name(param_name, not packed)
        if twin in state_dict:
            raise ValueError(f"state_dict holds two masks of {owner}.{param_name} ({key!r} and {twin!r}); "
                             "keep one")
        if packed:
            _set_bits(module, value, param_name, key)
        else:
            if not isinstance(value, Tensor):
                raise ValueError(f"{key}: a mask must be a tensor, got {type(value).__name__}")
            set_mask(module, value.to(torch.bool), param_name, packed=False, where=key)
    return model


def remove_mask(module: nn.Module, param_name: str = "weight") -> None:
    """Drop the mask of ``module.<param_name>``, bool or packed (the zeros stay in the parameter)."""
    for packed in (False, True):
        module._buffers.pop(mask_buffer_name(param_name, packed), None)
    module.__dict__.get(_SHARDS, {}).pop(param_name, None)


def remove_masks(model: nn.Module) -> nn.Module:
    """Drop every mask buffer, bool or packed (the zeros stay in the parameters)."""
    for module in model.modules():
        for name in [n for n, b in module._buffers.items() if b is not None and _mask_param_name(module, n)]:
            del module._buffers[name]
        module.__dict__.pop(_SHARDS, None)
    return model


def pack_masks_(model: nn.Module) -> nn.Module:
    """Store every bool mask of ``model`` bit-packed (1/8 of the memory), in place; the weights and
    what :func:`get_mask` returns do not change."""
    reshard(model)  # FSDP2: the sharded parameters registered again (a forward leaves the root gathered)
    for module, param_name, mask in masked_parameters(model):
        if mask.dtype == torch.bool:  # a sharded one: each rank packs its slice
            param = getattr(module, param_name)
            _store(module, param_name, pack_mask(local(mask)), True, param if is_sharded(param) else None)
    return model


def unpack_masks_(model: nn.Module) -> nn.Module:
    """Store every packed mask of ``model`` as a bool buffer again, in place (the inverse of :func:`pack_masks_`)."""
    for module, param_name, mask in masked_parameters(model):
        if mask.dtype != torch.bool:
            _store(module, param_name, get_mask(module, param_name), False)
    return model


def whole_packed_masks(model: nn.Module) -> dict[str, Tensor]:
    """State_dict key -> the whole tensor's packed mask, for every packed mask of a sharded parameter
    (each rank holds its slice's bits): gathered one layer at a time, on the CPU, on rank 0 only
    (``{}`` elsewhere). A collective: every rank calls it."""
    from .distributed import rank

    out = {}
    for prefix, module in model.named_modules():
        for param_name in [n for n in module._parameters if _packed_shard(module, n) is not None]:
            if module._buffers.get(mask_buffer_name(param_name, True)) is None:
                continue
            bits = full_mask(module, param_name)
            if rank() == 0:
                out[(prefix + "." if prefix else "") + mask_buffer_name(param_name, True)] = bits.cpu()
    return out


# ----- selection and counts ------------------------------------------------------------------------------
def prunable_modules(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None,
                     types: Iterable[type] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) -> dict[str, nn.Module]:
    """Every Conv/Linear of ``model`` accepted by ``filter_fn(module, fqn)``."""
    types = tuple(types)
    return {n: m for n, m in model.named_modules()
            if isinstance(m, types) and (filter_fn is None or filter_fn(m, n))}


def remaining_weights(module: nn.Module) -> int:
    """Kept weights of ``module.weight`` (all of them without a mask); a packed mask is counted as bits."""
    mask = stored_mask(module)
    n = module.weight.numel()
    if mask is None:
        return n
    if is_sharded(mask):  # this rank's slice, summed over the ranks
        return sharded_sum(int(local(mask).sum()), mask)
    shard = _packed_shard(module, "weight") if mask.dtype != torch.bool else None
    if shard is not None:  # the bits of this rank's slice, summed over the ranks
        return sharded_sum(count_kept_bits(mask, local(shard).numel()), shard)
    return int(mask.sum()) if mask.dtype == torch.bool else count_kept_bits(mask, n)


def sparsity(modules: Mapping[str, nn.Module]) -> tuple[float, dict[str, float]]:
    """(overall fraction of masked weights, per-layer fraction) over the given modules."""
    per_layer, masked, total = {}, 0, 0
    for name, module in modules.items():
        n = module.weight.numel()
        m = n - remaining_weights(module)
        per_layer[name] = m / n if n else 0.0
        masked, total = masked + m, total + n
    return (masked / total if total else 0.0), per_layer
