"""The entropy-weighted pruning budget of NEPENTHE (docs/method.md §2), and the magnitude masks it implies.

``weights_to_prune`` decides *how many* weights each prunable layer loses this round;
``magnitude_masks`` decides *which* (the smallest remaining magnitudes, per layer). Both work on
plain tensors and know nothing of models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["NORMALIZATIONS", "fan_in", "global_magnitude_counts", "global_magnitude_masks", "irrelevance",
           "magnitude_mask", "weights_to_prune"]

NORMALIZATIONS = ("none", "fan_in")


def fan_in(weight: torch.Tensor) -> int:
    """Inputs of one output neuron: in_features of a Linear, in_channels/groups × kernel of a conv."""
    return int(weight[0].numel()) if weight.dim() > 1 and weight.shape[0] else 1


def irrelevance(entropy: float, weight: torch.Tensor, mask: torch.Tensor | None, normalize: str = "none") -> float:
    """I_l = H_l · mean |w| over the remaining (unmasked) weights; 0 when none remain.

    ``normalize="fan_in"`` multiplies the magnitude term by √fan-in. Trained weights keep roughly
    the 1/√fan-in scale of their initialisation, so without it a wide-input layer (a 784-input
    stem) looks the least relevant of all for its fan-in alone, and the sharp softmax of the
    budget empties it first.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    w = weight.detach().abs()
    if mask is not None:
        w = w[mask]
    if not w.numel():
        return 0.0
    scale = math.sqrt(fan_in(weight)) if normalize == "fan_in" else 1.0
    return float(entropy) * float(w.to(torch.float64).mean()) * scale


def _largest_remainder(amounts: dict[str, float], total: int) -> dict[str, int]:
    """Integers that sum to ``total`` and are each floor/ceil of ``amounts`` (Hamilton's method)."""
    floors = {k: math.floor(v) for k, v in amounts.items()}
    left = total - sum(floors.values())
    by_fraction = sorted(amounts, key=lambda k: (amounts[k] - floors[k], k), reverse=True)
    for k in by_fraction[: max(left, 0)]:
        floors[k] += 1
    return floors


def weights_to_prune(
    entropy: Mapping[str, float],
    remaining: Mapping[str, int],
    irrelevances: Mapping[str, float],
    zeta: float = 0.5,
    temperature: float = 1.0,
    limits: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Number of weights to prune in each layer this round (docs/method.md §2).

    ``entropy[l]`` is H_l of the rectifier layer fed by l, ``remaining[l]`` its unmasked weight
    count, ``irrelevances[l]`` = H_l · mean|w| (see :func:`irrelevance`). Layers with H = 0 or no
    weights left are frozen (0). The budget B = floor(ζ · Σ remaining over prunable layers) is
    split by softmax(R / τ), R_l = Σ_k I_k / I_l; a layer whose share reaches its limit is given
    its limit and leaves the pool with its irrelevance, and the rest of the budget is re-split
    (water-filling) until no layer overflows. The limit of a layer is its remaining count (it is
    emptied), or ``limits[l]`` when smaller (a per-layer cap; a layer whose limit is 0 is frozen).
    Budget that no layer can take is left unspent. Layers with I_l = 0 (remaining weights all
    exactly zero, yet H > 0) are infinitely irrelevant: they are emptied first.
    """
    if not 0.0 <= zeta <= 1.0:
        raise ValueError(f"zeta must be in [0, 1], got {zeta}")
    if not temperature > 0:  # also refuses NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")
    limit = {n: min(remaining[n], max(int((limits or {}).get(n, remaining[n])), 0)) for n in remaining}
    result = {name: 0 for name in remaining}
    pool = [name for name in remaining if limit[name] > 0 and entropy.get(name, 0.0) > 0.0]
    budget = math.floor(zeta * sum(remaining[n] for n in pool))

    # Zero-irrelevance layers first: their R is infinite, so they take the budget before anyone.
    free = [n for n in pool if irrelevances[n] <= 0.0]
    if free:
        free_total = sum(limit[n] for n in free)
        if free_total <= budget:
            for n in free:
                result[n] = limit[n]
            budget -= free_total
            pool = [n for n in pool if n not in free]
        else:
            share = _largest_remainder({n: budget * limit[n] / free_total for n in free}, budget)
            result.update(share)
            return result

    while pool and budget > 0:
        total_irrelevance = sum(irrelevances[n] for n in pool)
        logits = torch.tensor([total_irrelevance / irrelevances[n] / temperature for n in pool], dtype=torch.float64)
        shares = torch.softmax(logits, dim=0).tolist()  # softmax subtracts the max internally
        amounts = {n: budget * s for n, s in zip(pool, shares)}
        overflow = [n for n in pool if amounts[n] >= limit[n]]
        if not overflow:
            result.update(_largest_remainder(amounts, budget))
            break
        for n in overflow:
            result[n] = limit[n]
            budget -= limit[n]
        pool = [n for n in pool if n not in overflow]
    return result


def magnitude_mask(weight: torch.Tensor, mask: torch.Tensor | None, n_prune: int) -> torch.Tensor:
    """A new bool mask with the ``n_prune`` smallest-magnitude remaining weights also removed.

    Masks only grow: already-masked weights stay masked. Ties are broken by position so the
    result is deterministic.
    """
    # contiguous on purpose: reshape(-1) below must be a view (a channels_last or transposed mask
    # would be copied by it, and the pruning written into the copy would be lost)
    keep = (torch.ones(weight.shape, dtype=torch.bool, device=weight.device) if mask is None
            else mask.clone(memory_format=torch.contiguous_format))
    if n_prune <= 0:
        return keep
    flat_keep = keep.reshape(-1)
    alive = flat_keep.nonzero().squeeze(1)
    if n_prune >= alive.numel():
        flat_keep.zero_()
        return keep
    magnitudes = weight.detach().reshape(-1)[alive].abs().to(torch.float64)
    # stable sort: equal magnitudes are pruned in index order, identically on every process
    order = torch.sort(magnitudes, stable=True).indices
    flat_keep[alive[order[:n_prune]]] = False
    return keep


def global_magnitude_counts(
    weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor | None], fraction: float,
    limits: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """IMP's step as counts: how many weights each layer loses when ``fraction`` of all remaining
    weights are pruned by one global magnitude threshold.

    ``limits[l]`` caps what layer l may lose; the weights a capped layer cannot give go to the
    next smallest magnitudes of the other layers, so the global count is kept when it can be.
    """
    alive = {n: (torch.ones_like(w, dtype=torch.bool) if masks.get(n) is None else masks[n])
             for n, w in weights.items()}
    values = torch.cat([weights[n].detach().abs().to(torch.float64)[alive[n]].reshape(-1) for n in weights])
    n_prune = math.floor(fraction * values.numel())
    if n_prune == 0:
        return {n: 0 for n in weights}
    sizes = torch.tensor([int(alive[n].sum()) for n in weights], dtype=torch.int64)
    owners = torch.repeat_interleave(torch.arange(len(weights)), sizes)
    # rank all remaining weights globally (stable: ties in index order, the same on every process)
    order = torch.sort(values, stable=True).indices
    if limits is not None:
        cap = torch.tensor([min(int(limits.get(n, s)), int(s)) for n, s in zip(weights, sizes.tolist())])
        sorted_owners = owners[order]
        # rank of each weight among its own layer's weights, in global order
        by_owner = torch.sort(sorted_owners, stable=True)
        starts = torch.cumsum(sizes, 0) - sizes
        rank = torch.empty_like(order)
        rank[by_owner.indices] = torch.arange(len(order)) - starts[by_owner.values]
        order = order[rank < cap[sorted_owners]]
    order = order[:n_prune]
    counts = torch.zeros(len(weights), dtype=torch.int64)
    counts.index_add_(0, owners[order], torch.ones_like(order))
    return {n: int(c) for n, c in zip(weights, counts)}


def global_magnitude_masks(
    weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor | None], fraction: float,
    limits: Mapping[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """IMP's step: prune ``fraction`` of all remaining weights by one global magnitude threshold
    (per-layer ``limits`` as in :func:`global_magnitude_counts`)."""
    counts = global_magnitude_counts(weights, masks, fraction, limits)
    return {n: magnitude_mask(w, masks.get(n), counts[n]) for n, w in weights.items()}
