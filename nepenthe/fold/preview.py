"""A preview of folding from declared neuron states, without training: forced statistics, emptied
layers, and the linearized model that folding must reproduce.

Used by the exactness tests and the latency benchmark, and useful to anyone who wants to know what
folding would give on a model before pruning it:

* :func:`forced_stats` — statistics that declare chosen call sites always-ON / always-OFF /
  saturated (per neuron if wanted) and every other one mixed (entropy > 0);
* :func:`empty_layers` — zero whole Conv/Linear weights, as pruning does when it empties a layer;
* :func:`linearized` — the model with each rectifier replaced by what the statistics say it
  computes (its per-neuron affine map where the layer is linearizable; the dead ReLU neurons that
  folding zeroes, zeroed). On *any* input, ``fold(model, stats, ...)`` equals this model up to
  float rounding; on inputs that keep the calibration states it also equals ``model`` itself.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Iterable, Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from .. import ops
from ..activations import Rectifier
from ..entropy import EntropyStats, measure
from ..graph import find_sites, trace
from ..masks import remove_masks, stored_mask
from .modules import StateRectifier
from .passes.rectifiers import dead_neuron_producer, region_affine

__all__ = ["STATE_CODES", "NeuronState", "empty_layers", "forced_stats", "linearized"]


class NeuronState(enum.IntEnum):
    """Per-neuron state codes of :func:`forced_stats` (not the histogram columns of ``nepenthe.ops``,
    whose ``ops.SAT`` is a column index: hence an enum of its own)."""

    ON = 0
    OFF = 1
    SAT = 2
    MIXED = 3


STATE_CODES = {state.name.lower(): state for state in NeuronState}


def _codes(name: str, state, channels: int, rect: Rectifier) -> torch.Tensor:
    if isinstance(state, str):
        if state not in STATE_CODES:
            raise ValueError(f"state of call site {name!r} must be one of {sorted(STATE_CODES)} or a tensor of codes, "
                             f"got {state!r}")
        codes = torch.full((channels,), STATE_CODES[state], dtype=torch.long)
    else:
        codes = torch.as_tensor(state, dtype=torch.long).flatten()
        if codes.numel() != channels or bool(((codes < NeuronState.ON) | (codes > NeuronState.MIXED)).any()):
            raise ValueError(f"call site {name!r} has {channels} neurons: give {channels} state codes in "
                             f"0..3 (on, off, sat, mixed), got {tuple(codes.shape)} values")
    if rect.upper is None and bool((codes == NeuronState.SAT).any()):
        raise ValueError(f"call site {name!r} ({rect.kind}) has no upper kink: it cannot be saturated")
    return codes


def forced_stats(model: nn.Module, example_input, states: Mapping[str, object] | None = None, *,
                 default: str = "mixed") -> EntropyStats:
    """Statistics of ``model`` in which the neurons of each call site are in the given states.

    ``states`` maps call-site names to ``"on"``, ``"off"``, ``"sat"``, ``"mixed"`` or a tensor of
    per-neuron codes (:class:`NeuronState`). Call sites not named get
    ``default`` (``"measured"`` keeps what ``example_input`` gives). The call sites and neuron counts
    come from one ``nepenthe.measure`` pass over ``example_input``.
    """
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    stats = measure(model, [args], input_fn=lambda batch: batch)
    states = dict(states or {})
    unknown = sorted(set(states) - set(stats.histogram))
    if unknown:
        raise ValueError(f"no call sites named {unknown[:5]} in this model; it has {sorted(stats.histogram)[:8]}...")
    for name, hist in stats.histogram.items():
        state = states.get(name, default)
        if state == "measured":
            continue
        codes = _codes(name, state, hist.shape[0], stats.sites[name].rectifier)
        forced = torch.zeros_like(hist)
        on, off = codes == NeuronState.ON, codes == NeuronState.OFF
        sat, mixed = codes == NeuronState.SAT, codes == NeuronState.MIXED
        forced[:, ops.ON] = (on | mixed | sat).long()  # the SAT column counts a subset of the ON column
        forced[:, ops.OFF] = (off | mixed).long()
        forced[:, ops.SAT] = sat.long()
        stats.histogram[name] = forced
    return stats


@torch.no_grad()
def empty_layers(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Zero the whole weight of each named Conv/Linear (and its mask, if it has one), in place."""
    for name in names:
        module = model.get_submodule(name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"{name!r} ({type(module).__name__}) has no weight to empty")
        weight.zero_()
        mask = stored_mask(module)  # bool or packed: all zeros means every weight masked in both
        if mask is not None:
            mask.zero_()
    return model


def _state_maps(rect: Rectifier, stats: EntropyStats, name: str, approximate: bool, zeroable: bool):
    """(keep φ, slope, offset) per neuron: what folding makes of this call site (``zeroable``: its
    dead neurons can be zeroed in the op that produces them, so folding does)."""
    off, sat = stats.always_off[name].cpu(), stats.always_saturated[name].cpu()
    slope, offset = region_affine(rect, off, sat)
    if stats.linearizable(name) and (rect.exact or approximate):
        return torch.zeros_like(off), slope, offset
    if rect.exact and rect.off_slope == 0.0 and zeroable:  # folding zeroes the dead neurons of a ReLU that stays
        return ~off, torch.zeros_like(slope), offset * 0
    return torch.ones_like(off), slope, offset


def linearized(model: nn.Module, stats: EntropyStats, *, approximate: bool = False) -> fx.GraphModule:
    """A copy of ``model`` whose rectifiers compute what ``stats`` say they do (no merging, no BN
    fusion): the reference that ``fold(model, stats, ..., approximate=approximate)`` reproduces."""
    was_training = model.training
    model.eval()
    try:
        gm = trace(copy.deepcopy(model), "linearizing")
    finally:
        model.train(was_training)
    gm.eval()
    remove_masks(gm)
    for site in find_sites(gm):
        if site.name not in stats.histogram:
            continue
        info = stats.sites[site.name]
        hist = stats.histogram[site.name]
        zeroable = dead_neuron_producer(gm, site.node, hist.shape[0], info.channel_dim) is not None
        keep, slope, offset = _state_maps(site.rectifier, stats, site.name, approximate, zeroable)
        if bool(keep.all()):
            continue
        target = f"_state_{len(list(gm.named_children()))}"
        gm.add_module(target, StateRectifier(site.rectifier, keep, slope, offset, info.channel_dim))
        with gm.graph.inserting_after(site.node):
            new = gm.graph.call_module(target, (site.node.args[0],))
        site.node.replace_all_uses_with(new)
        gm.graph.erase_node(site.node)
    gm.graph.lint()
    gm.recompile()
    return gm
