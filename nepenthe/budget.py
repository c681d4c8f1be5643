"""The entropy-weighted pruning budget of NEPENTHE (docs/method.md §2), and the magnitude masks it implies.

``weights_to_prune`` decides *how many* weights each prunable layer loses this round;
``magnitude_masks`` decides *which* (the smallest remaining magnitudes, per layer). Both work on
plain tensors and know nothing of models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .masks import packed_mask_bytes, unpack_mask

__all__ = ["NORMALIZATIONS", "MagnitudeThreshold", "fan_in", "global_magnitude_counts", "global_magnitude_masks",
           "irrelevance", "is_packed", "magnitude_mask", "magnitude_threshold", "sum_across_processes",
           "weights_to_prune"]

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
    if is_packed(weight, mask):  # this layer's only
        mask = unpack_mask(mask.to(weight.device), weight.shape)
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


# ----- exact selection by the bit patterns of |w| -------------------------------------------------
# The k smallest remaining magnitudes are found without a sorted (or even a float64) copy of the
# weights: the IEEE bit pattern of a non-negative float, read as an integer, orders like its value,
# so a radix selection over those integers needs only histograms. Each pass streams every weight in
# slices of _CHUNK elements, counts the remaining ones whose key shares the prefix found so far by
# their next digit, and keeps the bucket holding the k-th key; after a few passes the prefix is the
# k-th key itself. The counts of a pass are int64 sums over weights, so the partial counts of
# disjoint parts (two layers, two shards of one layer, two processes) combine by addition: that
# is what ``reduce`` (an all-reduce) plugs into.

_CHUNK = 1 << 20  # elements per slice: every temporary of a pass stays a few MiB, whatever the model
_DIGIT_BITS = 11  # 2048 buckets a layer per pass: 3 passes for fp32 keys, 2 for fp16 / bf16
# key dtype (the float's bits as an integer), value bits without the sign, bit pattern of +inf
_FORMATS = {torch.float16: (torch.int16, 15, 0x7C00), torch.bfloat16: (torch.int16, 15, 0x7F80),
            torch.float32: (torch.int32, 31, 0x7F800000), torch.float64: (torch.int64, 63, 0x7FF0000000000000)}


@dataclass(frozen=True)
class MagnitudeThreshold:
    """Where a magnitude selection cut: ``counts[l]`` weights of layer l are pruned, all of them
    with |w| below the threshold (``below[l]`` remaining weights of l are) plus, of the ``ties[l]``
    remaining weights equal to it, the first ones in (layer, position) order. ``key`` is the
    threshold's bit pattern in ``format`` (-1 when nothing is pruned)."""

    key: int
    format: torch.dtype
    counts: dict[str, int]
    below: dict[str, int]
    ties: dict[str, int]

    @property
    def value(self) -> float:
        """The threshold |w| itself (NaN when the selection reached NaN weights; -1 when empty)."""
        if self.key < 0:
            return -1.0
        bits = torch.tensor([self.key], dtype=_FORMATS[self.format][0])
        return float(bits.view(self.format)[0])


def _key_format(dtypes) -> torch.dtype:
    """The float format every magnitude is compared in: the weights' own when they share one, else
    one that holds each of them exactly (fp16 and bf16 both fit in fp32), so the order is the
    order of the exact values, as in a float64 sort."""
    dtypes = set(dtypes)
    if len(dtypes) == 1 and next(iter(dtypes)) in _FORMATS:
        return next(iter(dtypes))
    return torch.float32 if dtypes <= {torch.float16, torch.bfloat16, torch.float32} else torch.float64


class _Keys:
    """Integer keys ordered like |w|, one slice at a time, written into buffers reused for every
    slice: the sign bit cleared (so -0.0 is 0.0) and every NaN one key above inf (a sort puts NaNs
    last and keeps their index order; so do the ties of one key). Reusing the buffers matters
    beyond memory: a fresh multi-MiB tensor per slice costs its page faults every time."""

    def __init__(self, fmt: torch.dtype):
        self.fmt, (self.int_dtype, bits, inf) = fmt, _FORMATS[fmt]
        self.value_bits, self.nan = (1 << bits) - 1, inf + 1
        self.buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, a bool scratch of the same length), both valid until the next call."""
        held = self.buffers.get(values.device)
        if held is None or held[0].numel() < values.numel():  # grown to the largest slice seen
            n = values.numel()
            self.buffers[values.device] = (torch.empty(n, dtype=self.int_dtype, device=values.device),
                                           torch.empty(n, dtype=self.fmt, device=values.device),
                                           torch.empty(n, dtype=torch.bool, device=values.device))
        keys, floats, flags = (t[: values.numel()] for t in self.buffers[values.device])
        if values.dtype != self.fmt:  # exact: the format holds every value of each weight's dtype
            values = floats.copy_(values)
        torch.bitwise_and(values.view(self.int_dtype), self.value_bits, out=keys)
        return keys.clamp_max_(self.nan), flags


def is_packed(weight: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether ``mask`` is ``weight``'s mask bit-packed (:func:`nepenthe.masks.pack_mask`: ``uint8``), not
    ``bool`` of its shape; a uint8 mask of another length is refused (ValueError)."""
    if mask is None or mask.dtype != torch.uint8:
        return False
    if mask.dim() != 1 or mask.numel() != packed_mask_bytes(weight.numel()):
        raise ValueError(f"a packed mask of a weight of shape {tuple(weight.shape)} must be "
                         f"uint8[{packed_mask_bytes(weight.numel())}], got uint8{list(mask.shape)}")
    return True


class _PackedAlive:
    """A packed mask read as the flat bool mask, one slice at a time (``alive[start:stop]``, ``start``
    a multiple of 8): a slice's bits are unpacked, never the whole layer's."""

    def __init__(self, bits: torch.Tensor, numel: int):
        self.bits, self.numel = bits.contiguous(), numel

    def __getitem__(self, part: slice) -> torch.Tensor:
        start, stop = part.start or 0, min(part.stop if part.stop is not None else self.numel, self.numel)
        chunk = self.bits[start // 8:(stop + 7) // 8]
        return unpack_mask(chunk, (chunk.numel() * 8,))[: stop - start]


def _flat(weight: torch.Tensor, mask: torch.Tensor | None):
    """(|w| source, alive) in row-major order: a view for a contiguous tensor (a copy of this one layer
    otherwise); a bool mask flattened, a packed one read a slice at a time (:class:`_PackedAlive`)."""
    if is_packed(weight, mask):
        return weight.detach().reshape(-1), _PackedAlive(mask, weight.numel())
    return weight.detach().reshape(-1), (None if mask is None else mask.reshape(-1))


def _histograms(flats, keys_of: _Keys, shift: int, bits: int, prefix: int) -> torch.Tensor:
    """[layers, 2**bits] int64 on the CPU: per layer, the remaining weights whose key has ``prefix``
    above bit ``shift + bits``, counted by the ``bits`` below it."""
    n = 1 << bits
    out = torch.zeros(len(flats), n, dtype=torch.int64)
    for i, (w, alive) in enumerate(flats):
        row = torch.zeros(n + 2, dtype=torch.int64, device=w.device)
        for start in range(0, w.numel(), _CHUNK):
            key, _ = keys_of(w[start:start + _CHUNK])
            # 1 + the digit for a key with the prefix; 0 or n + 1 (not counted) for any other key,
            # and 0 for a masked weight: the shift first, so no key overflows its integer type
            key.bitwise_right_shift_(shift).sub_((prefix << bits) - 1).clamp_(0, n + 1)
            if alive is not None:
                key.mul_(alive[start:start + _CHUNK])
            row += torch.bincount(key, minlength=n + 2)
        out[i] = row[1:n + 1].cpu()
    return out


def _digits(bits: int) -> list[tuple[int, int]]:
    """(shift, width) of each pass, most significant first, widths as even as _DIGIT_BITS allows."""
    passes = -(-bits // _DIGIT_BITS)
    widths = [bits // passes + (i < bits % passes) for i in range(passes)]
    shifts = [bits - sum(widths[: i + 1]) for i in range(passes)]
    return list(zip(shifts, widths))


def _select(flats, keys_of: _Keys, first: torch.Tensor, n_prune: int, caps: torch.Tensor,
            reduce) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The key T of the ``n_prune``-th weight taken when the remaining weights are walked in (|w|,
    layer, position) order and layer l gives at most ``caps[l]`` (0 < n_prune < Σ caps), with the
    per-layer counts of remaining keys < T and == T. ``first`` is the first pass's histogram."""
    below = torch.zeros(len(flats), dtype=torch.int64)
    prefix, hist = 0, first
    for i, (shift, bits) in enumerate(_digits(_FORMATS[keys_of.fmt][1])):
        if i:
            hist = _histograms(flats, keys_of, shift, bits, prefix)
            hist = reduce(hist) if reduce is not None else hist
        upto = below[:, None] + hist.cumsum(1)  # per layer: remaining keys up to each bucket's end
        taken = torch.minimum(upto, caps[:, None]).sum(0)  # what the walk takes up to there
        bucket = int(torch.searchsorted(taken, n_prune))  # the first bucket reaching n_prune
        below += hist[:, :bucket].sum(1)
        prefix = (prefix << bits) | bucket
    return prefix, below, hist[:, bucket]


def magnitude_threshold(
    weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor | None], fraction: float,
    limits: Mapping[str, int] | None = None, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> MagnitudeThreshold:
    """The global magnitude selection of IMP, streamed: ``floor(fraction · remaining)`` weights, the
    smallest |w| over all layers (ties in layer order, then position), layer l losing at most
    ``limits[l]`` (its excess goes to the next smallest of the others).

    Memory: a few MiB of temporaries and a [layers, 2048] int64 histogram, never a copy of the
    weights; a mask may be bool or bit-packed (:func:`is_packed`: read a slice at a time, never
    unpacked whole), so the masks of a model need not exist unpacked together.

    ``reduce(t)`` (e.g. :func:`sum_across_processes`) returns the element-wise sum of the int64
    tensor ``t`` over the parts of a model split between processes (each passes its local
    shards, under the same layer names and dtypes); every process then gets the same result. Which
    shard of a layer gives its ``counts - below`` ties is then decided by shard order (an exclusive
    scan of the per-shard tie counts), as one process decides by position.
    """
    names = list(weights)
    flats = [_flat(weights[n], masks.get(n)) for n in names]
    fmt = _key_format(weights[n].dtype for n in names)
    keys_of = _Keys(fmt)  # one set of slice buffers for every pass
    first = _histograms(flats, keys_of, *_digits(_FORMATS[fmt][1])[0], 0)
    first = reduce(first) if reduce is not None else first
    alive = first.sum(1)
    n_prune = math.floor(fraction * int(alive.sum()))
    caps = alive if limits is None else torch.tensor(
        [max(min(int(limits.get(n, a)), a), 0) for n, a in zip(names, alive.tolist())], dtype=torch.int64)
    zero = {n: 0 for n in names}
    if n_prune <= 0:
        return MagnitudeThreshold(-1, fmt, zero, zero, zero)
    if n_prune >= int(caps.sum()):  # every weight the caps allow
        return MagnitudeThreshold(-1, fmt, dict(zip(names, caps.tolist())), zero, zero)
    key, below, equal = _select(flats, keys_of, first, n_prune, caps, reduce)
    under = torch.minimum(below, caps)
    # the ties at the threshold go in layer order, each layer up to its cap
    spare = torch.minimum(caps - under, equal)
    left = n_prune - int(under.sum())
    from_ties = (left - (torch.cumsum(spare, 0) - spare)).clamp(min=0)
    counts = under + torch.minimum(spare, from_ties)
    return MagnitudeThreshold(key, fmt, dict(zip(names, counts.tolist())), dict(zip(names, below.tolist())),
                              dict(zip(names, equal.tolist())))


def sum_across_processes(group=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``reduce`` for :func:`magnitude_threshold`: all-reduce (sum) over ``group`` of
    torch.distributed (on the current CUDA device for NCCL)."""
    import torch.distributed as dist

    from .distributed import collective_device

    def reduce(t: torch.Tensor) -> torch.Tensor:
        on = t.to(collective_device(group), copy=True)
        dist.all_reduce(on, group=group)
        return on.cpu()
    return reduce


def magnitude_mask(weight: torch.Tensor, mask: torch.Tensor | None, n_prune: int) -> torch.Tensor:
    """A new bool mask with the ``n_prune`` smallest-magnitude remaining weights also removed.

    Masks only grow: already-masked weights stay masked. Ties are broken by position so the
    result is deterministic (exactly a stable sort's choice, found by :func:`magnitude_threshold`'s
    streamed selection: no sorted or float64 copy of the layer). ``mask`` is bool or packed
    (:func:`is_packed`); either way the result is this layer's only bool copy.
    """
    # contiguous on purpose: reshape(-1) below must be a view (a channels_last or transposed mask
    # would be copied by it, and the pruning written into the copy would be lost)
    if is_packed(weight, mask):
        keep = unpack_mask(mask.to(weight.device), weight.shape)  # a fresh contiguous tensor
    else:
        keep = (torch.ones(weight.shape, dtype=torch.bool, device=weight.device) if mask is None
                else mask.clone(memory_format=torch.contiguous_format))
    if n_prune <= 0:
        return keep
    flat_keep = keep.reshape(-1)
    layer = [(_flat(weight, None)[0], None if mask is None else flat_keep)]
    w, keys_of = layer[0][0], _Keys(_key_format([weight.dtype]))
    first = _histograms(layer, keys_of, *_digits(_FORMATS[keys_of.fmt][1])[0], 0)
    if n_prune >= int(first.sum()):
        flat_keep.zero_()
        return keep
    key, below, _ = _select(layer, keys_of, first, n_prune, first.sum(1), None)
    ties = n_prune - int(below[0])  # of the weights equal to the threshold, the first ones go
    for start in range(0, w.numel(), _CHUNK):
        k, flags = keys_of(w[start:start + _CHUNK])
        part = flat_keep[start:start + _CHUNK]
        if ties:  # the first remaining weights equal to the threshold, in position order
            equal = torch.eq(k, key, out=flags).logical_and_(part)
            found = int(equal.sum())
            if found > ties:
                equal[equal.nonzero().squeeze(1)[ties:]] = False
            part.masked_fill_(equal, False)
            ties -= min(found, ties)
        part.masked_fill_(torch.lt(k, key, out=flags), False)
    return keep


def global_magnitude_counts(
    weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor | None], fraction: float,
    limits: Mapping[str, int] | None = None, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, int]:
    """IMP's step as counts: how many weights each layer loses when ``fraction`` of all remaining
    weights are pruned by one global magnitude threshold (:func:`magnitude_threshold`).

    ``limits[l]`` caps what layer l may lose; the weights a capped layer cannot give go to the
    next smallest magnitudes of the other layers, so the global count is kept when it can be.
    """
    return magnitude_threshold(weights, masks, fraction, limits, reduce).counts


def global_magnitude_masks(
    weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor | None], fraction: float,
    limits: Mapping[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """IMP's step: prune ``fraction`` of all remaining weights by one global magnitude threshold
    (per-layer ``limits`` as in :func:`global_magnitude_counts`)."""
    counts = global_magnitude_counts(weights, masks, fraction, limits)
    return {n: magnitude_mask(w, masks.get(n), counts[n]) for n, w in weights.items()}
