"""Pruning methods as objects: each rule the loop can run (NEPENTHE, EGP, IMP, EASIER) implements the
same small interface, and a user can pass their own (the shape of Torch-Pruning's importance
objects)::

    class Halve(nepenthe.loop.PruningMethod):
        name = "halve"
        def step(self, pruner, stats, scale, avoid):
            counts = {n: int(0.5 * scale * remaining_weights(m)) for n, m in pruner.layers.items()}
            return pruner.prune_by_magnitude(counts)

    nepenthe.prune(model, data, retrain=..., evaluate=..., config=PruneConfig(method=Halve()))

The loop calls :meth:`PruningMethod.layers` once (which Conv/Linear it may prune) and
:meth:`PruningMethod.step` once per attempt; back-off, caps, checkpoints and resume stay the loop's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch.nn as nn

from .. import budget
from ..distributed import rank
from ..entropy import EntropyStats
from ..masks import full_mask, prunable_modules, remaining_weights, stored_mask
from ..sharded import counted_here, full, is_sharded, local

if TYPE_CHECKING:
    from .pruner import Pruner, Step

__all__ = ["EASIER", "EGP", "IMP", "METHODS", "Nepenthe", "PruningMethod", "get_method"]


class PruningMethod:
    """One pruning rule. Subclasses set ``name`` and implement :meth:`step`.

    * ``entropy`` — the :func:`nepenthe.measure` options the method's statistics use (docs/method.md §1);
    * ``needs_graph`` — False when the method can run on a model torch.fx cannot trace (the loop
      then has no cut check);
    * ``scalable`` — False when a step cannot be made smaller (back-off then tries the step's
      ``avoid`` list instead, as EASIER does).
    """

    name: str = "custom"
    entropy: dict = dict(zero_as="exclude", aggregate="mean", estimator="pooled", saturation=True)
    needs_graph: bool = True
    scalable: bool = True

    def layers(self, pruner: Pruner) -> dict[str, nn.Module]:
        """The prunable Conv/Linear layers by qualified name: by default those that feed a rectifier
        (docs/method.md §2's set L), minus protected / filtered ones."""
        modules = dict(pruner.model.named_modules())
        return {p: modules[p] for p in dict.fromkeys(pruner.site_layers.values())}

    def step(self, pruner: Pruner, stats: EntropyStats, scale: float, avoid: Sequence[str]) -> Step:
        """Prune once (``scale`` ≤ 1 after back-offs) and say what changed."""
        raise NotImplementedError(f"{type(self).__name__}.step")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _whole(module):
    """A layer's weight and mask whole (an FSDP2 layer gathered: one layer at a time, so that the
    budget is computed exactly as by one process; a packed mask stays packed)."""
    return full(module.weight), full_mask(module)


def _rank_parts(weights: dict, masks: dict) -> tuple[dict, dict]:
    """Each rank's part of every layer for a summed selection: its slice of a sharded layer (on the
    first replica only, HSDP); all of an unsharded one on rank 0 and nothing elsewhere (so that each
    weight is counted once)."""
    main = rank() == 0
    parts, part_masks = {}, {}
    for n, w in weights.items():
        m = masks.get(n)
        if is_sharded(w) and counted_here(w):
            parts[n], part_masks[n] = local(w), None if m is None else local(m)
        elif is_sharded(w):  # a replica of a slice another rank counts
            parts[n] = local(w).detach().reshape(-1)[:0]
            part_masks[n] = None if m is None else local(m).reshape(-1)[:0]
        else:
            parts[n] = w if main else w.detach().reshape(-1)[:0]
            part_masks[n] = m if main or m is None else m.reshape(-1)[:0]
    return parts, part_masks


class Nepenthe(PruningMethod):
    """The entropy-weighted budget of docs/method.md §2: low-entropy, low-magnitude layers lose the most."""

    name = "nepenthe"

    def step(self, pruner, stats, scale, avoid):
        cfg = pruner.config
        entropy = pruner.layer_entropy(stats)
        remaining = {n: remaining_weights(m) for n, m in pruner.layers.items()}
        # a packed mask is unpacked inside, one layer at a time
        irrelevance = {n: budget.irrelevance(entropy.get(n, 0.0), *_whole(m), cfg.normalize)
                       for n, m in pruner.layers.items()}
        # The allocation at the full ζ, every layer's share times the back-off scale: a smaller
        # budget alone would still empty the least relevant layers first (the softmax gives them
        # nearly all of it), so a backed-off step shrinks each layer's cut instead. A cut layer
        # (a stem, any layer of a plain chain) is pruned no faster than the rate ζ.
        counts, capped = pruner.allocate(lambda limits: budget.weights_to_prune(
            entropy, remaining, irrelevance, cfg.zeta, cfg.temperature, limits), cut_rate=cfg.zeta, scale=scale)
        return pruner.prune_by_magnitude(counts, capped)


class EGP(Nepenthe):
    """Entropy-guided pruning: NEPENTHE's budget on EGP's entropy (per-batch, z = 0 as OFF, mixed
    mean, two-state ReLU6), as its released code computes it."""

    name = "egp"
    entropy = dict(zero_as="off", aggregate="mixed_mean", estimator="batch_mean", saturation=False)


class IMP(PruningMethod):
    """Iterative magnitude pruning: the ζ smallest remaining weights over all Conv/Linear layers."""

    name = "imp"
    needs_graph = False  # prunes every Conv/Linear; without a trace it only loses the cut check

    def layers(self, pruner):
        return {n: m for n, m in prunable_modules(pruner.model, pruner.config.filter_fn).items()
                if not pruner.protected(n)}

    def step(self, pruner, stats, scale, avoid):
        weights = {n: m.weight for n, m in pruner.layers.items()}
        masks = {n: stored_mask(m) for n, m in pruner.layers.items()}  # as stored: packed ones are read packed
        zeta = pruner.config.zeta * scale
        reduce = None
        if any(is_sharded(w) for w in weights.values()):  # FSDP2: each rank counts its slices, summed
            weights, masks = _rank_parts(weights, masks)
            reduce = budget.sum_across_processes()
        counts, capped = pruner.allocate(
            lambda limits: budget.global_magnitude_counts(weights, masks, zeta, limits, reduce))
        return pruner.prune_by_magnitude(counts, capped)


class EASIER(PruningMethod):
    """EASIER: each step replaces the lowest-entropy activation (and every zero-entropy one) by the
    identity; its entropy counts z = 0 as ON, per batch, two-state ReLU6 (its released code)."""

    name = "easier"
    entropy = dict(zero_as="on", aggregate="mean", estimator="batch_mean", saturation=False)
    scalable = False

    def step(self, pruner, stats, scale, avoid):
        from .pruner import Step

        entropy = {k: v for k, v in stats.layer_entropy.items() if k not in pruner.replaced}
        candidates = {k: v for k, v in entropy.items() if k not in avoid}
        if not candidates:
            return Step({}, [], {})
        lowest = min(candidates, key=lambda k: (candidates[k], k))
        chosen = [lowest] + [k for k, v in entropy.items() if v == 0.0 and k != lowest and k not in avoid]
        for site in chosen:
            pruner.replace_with_identity(site, stats)
        return Step({}, chosen, {})


METHODS: dict[str, type[PruningMethod]] = {cls.name: cls for cls in (Nepenthe, IMP, EGP, EASIER)}


def get_method(method: str | PruningMethod) -> PruningMethod:
    """The method object for a name of :data:`METHODS` (or ``method`` itself)."""
    if isinstance(method, PruningMethod):
        return method
    if isinstance(method, type) and issubclass(method, PruningMethod):
        return method()
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)} or a PruningMethod, got {method!r}")
    return METHODS[method]()
