"""Support tier: decisions that every process of a torch.distributed group takes together.

Under ``torchrun`` each rank runs the same loop on its shard of the data. A rank that fails alone
(an empty shard, NaN inputs, a bug in the user's ``retrain``) must not leave the others waiting in
the next collective until the process-group timeout (30 minutes for gloo), and a value that
decides what happens next (the accuracy against the tolerance, the stop) must be the same number
on every rank. So each phase ends with one small collective that says whether any rank failed
(:func:`agreed`): when one did, every rank raises the same :class:`RankError` naming the ranks and
their errors. Values are agreed by :func:`mean_over_ranks`, and state that must be identical
(masks, weights after retraining) is compared by digest (:func:`check_identical`).

Everything here is a no-op without an initialised process group, so single-process code pays
nothing. Collectives use CUDA tensors for NCCL and CPU tensors otherwise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .errors import NepentheError

__all__ = ["RankError", "agree", "agreed", "barrier", "check_identical", "collective_device", "digest", "from_main",
           "is_active", "is_main", "mean_over_ranks", "rank", "resampled", "shard_loader", "shardable", "world_size"]


class RankError(NepentheError, RuntimeError):
    """Raised on every rank when a phase failed on some of them; ``failures`` maps rank -> error,
    ``kinds`` rank -> the names of its error's classes (so a front end can tell a bad input, e.g. a
    ValueError, from a failed run on every rank, including those whose own part succeeded)."""

    def __init__(self, message: str, failures: dict[int, str], kinds: dict[int, tuple[str, ...]] | None = None):
        super().__init__(message)
        self.failures = failures
        self.kinds = kinds or {}


def is_active(group=None) -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def is_main(group=None) -> bool:
    """Rank 0, or the only process: the one that writes reports and checkpoints."""
    return rank(group) == 0


def barrier(group=None) -> None:
    if is_active(group):
        dist.barrier(group=group)


def collective_device(group=None) -> torch.device:
    """Where the tensors of a collective must live: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]


def agree(error: BaseException | None, what: str, group=None) -> None:
    """One collective: every rank says whether its part of ``what`` failed (``error``). If any did,
    every rank raises the same :class:`RankError` (chained to its own error where it had one);
    otherwise every rank goes on. Without a process group ``error`` is simply re-raised."""
    if not is_active(group):
        if error is not None:
            raise error
        return
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=collective_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if int(flag.item()) == 0:
        return
    messages: list = [None] * dist.get_world_size(group)
    mine = None if error is None else (_describe(error), tuple(c.__name__ for c in type(error).__mro__))
    dist.all_gather_object(messages, mine, group=group)
    failures = {r: m[0] for r, m in enumerate(messages) if m is not None}
    kinds = {r: m[1] for r, m in enumerate(messages) if m is not None}
    listed = "; ".join(f"rank {r}: {m}" for r, m in failures.items())
    raise RankError(f"{what} failed on {len(failures)} of {len(messages)} rank(s), so every rank stops here — "
                    f"{listed}", failures, kinds) from error


@contextmanager
def agreed(what: str, group=None) -> Iterator[None]:
    """Run the block on every rank, then :func:`agree` on whether it failed anywhere. The block
    must not need a collective after a point where it may fail on one rank only (put such a
    collective after the ``with``)."""
    error = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - every error is handed to agree, which re-raises it
        error = exc
    agree(error, what, group)


def _gathered_scalars(value, dtype: torch.dtype, group=None) -> list:
    """Every rank's ``value`` (one number), in rank order: one all-gather."""
    t = torch.tensor([value], dtype=dtype, device=collective_device(group))
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, t, group=group)
    return [g.item() for g in gathered]


def mean_over_ranks(value: float, group=None) -> float:
    """The mean of ``value`` over the ranks (the value itself without a process group): the one
    number every rank decides with (e.g. accuracies of per-rank validation shards)."""
    if not is_active(group):
        return value
    values = _gathered_scalars(float(value), torch.float64, group)
    # the value itself when the ranks agree (a sum divided back can differ in the last bit)
    return values[0] if len(set(values)) == 1 else sum(values) / len(values)


def digest(tensors: Iterable[torch.Tensor]) -> int:
    """A 63-bit digest of the tensors' values, shapes and dtypes (in order)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        if t.numel():
            h.update(t.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def check_identical(value: int, what: str, hint: str, group=None) -> None:
    """Every rank must hold the same ``value`` (a :func:`digest`); otherwise every rank raises the
    same :class:`RankError` naming the ranks that differ from rank 0, with ``hint`` (what to do)."""
    if not is_active(group):
        return
    values = _gathered_scalars(value, torch.int64, group)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise RankError(f"{what} differ between ranks (rank(s) {differ} differ from rank 0): {hint}",
                        {r: f"{what} differ from rank 0" for r in differ})


def from_main(value, group=None):
    """Rank 0's ``value`` on every rank (a decision only rank 0 can take, e.g. whether a file it
    wrote exists); ``value`` itself without a process group."""
    if not is_active(group):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return box[0]


def shard_loader(loader, group=None):
    """This rank's share of a ``DataLoader``: samples ``rank::world_size`` of its dataset, in order,
    batched as it batches (same batch size, collate function, workers). No sample is repeated, so
    counts summed over the ranks (histograms, correct predictions) are those of the whole dataset;
    the ranks may hold a different number of batches, so use it only where the one collective comes
    after the loop (measure, evaluate), never for DDP training. Anything that is not a map-style
    ``DataLoader`` (a list of batches, an iterable dataset) is returned as it is: every rank then
    sees all of it."""
    if not is_active(group) or not shardable(loader):
        return loader
    return resampled(loader, list(range(rank(group), len(loader.dataset), world_size(group))))


def shardable(loader) -> bool:
    """Whether ``loader`` is a map-style, automatically batched ``DataLoader`` (whose samples can be
    split between ranks by a sampler)."""
    from torch.utils.data import DataLoader, IterableDataset

    return isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset) \
        and loader.batch_size is not None


def resampled(loader, sampler):
    """A ``DataLoader`` over ``loader``'s dataset drawing the indices of ``sampler``, batched as
    ``loader`` batches (same batch size, collate function, workers)."""
    from torch.utils.data import DataLoader

    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, drop_last=loader.drop_last, pin_memory=loader.pin_memory)
