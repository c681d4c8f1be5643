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

__all__ = ["AgreedBatches", "RankError", "agree", "agreed", "agreed_batches", "barrier", "check_identical",
           "collective_device", "digest", "from_main", "is_active", "is_main", "mean_over_ranks", "rank", "resampled",
           "shard_loader", "shardable", "world_size"]


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
    if isinstance(error, RankError) and len({m and m[0] for m in messages}) == 1:
        raise error  # already agreed (every rank raised this same RankError in a nested phase): as it is
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


_END = object()


class AgreedBatches:
    """The batches of a loader, fetched one ahead, with every rank deciding together at each
    :meth:`advance` whether they all go on: for the training loop of a DDP model, whose forward and
    backward are collectives that a rank which stopped alone would leave the others waiting in until
    the process-group timeout. One small all-reduce per :meth:`advance` says whether any rank failed
    (its step's ``error``, or fetching the next batch: the same :class:`RankError` on every rank),
    whether any rank ran out of batches while others had more (a :class:`RankError` as well), and
    sums the caller's own ``flags`` (e.g. a NaN loss). Without a process group nothing is exchanged
    and errors are raised as they are."""

    END = _END

    def __init__(self, batches: Iterable, what: str = "the data", group=None):
        self.batches, self.what, self.group = batches, what, group
        self.items: Iterator | None = None
        self.count = 0  # batches handed out so far

    def _fetch(self):
        try:
            if self.items is None:
                self.items = iter(self.batches)
            return next(self.items, _END), None
        except Exception as exc:  # noqa: BLE001 - handed to every rank by agree
            return _END, exc

    def advance(self, error: BaseException | None = None, flags: Iterable[bool] = ()) -> tuple[object, list[int]]:
        """(the next batch, or :attr:`END` when every rank has run out; each of ``flags`` summed over
        the ranks). ``error``: this rank's failure in the step since the last call, which every rank
        then raises as one :class:`RankError` (so does a failure to fetch the next batch)."""
        step_error = error
        item, fetch_error = self._fetch() if step_error is None else (_END, None)
        error = step_error or fetch_error
        flags = [bool(f) for f in flags]
        if not is_active(self.group):
            if error is not None:
                raise error
            ended, sums = item is _END, [int(f) for f in flags]
        else:
            vector = torch.tensor([step_error is not None, fetch_error is not None, item is _END and error is None,
                                   *flags], dtype=torch.int32, device=collective_device(self.group))
            dist.all_reduce(vector, group=self.group)
            step_failed, fetch_failed, ends, *sums = (int(v) for v in vector.tolist())
            if step_failed or fetch_failed:  # every rank saw it: all of them raise the same RankError
                # (the batch of the step that failed, else the one that could not be fetched)
                agree(error, f"{self.what}, batch {self.count - 1 if step_failed else self.count},", self.group)
            if 0 < ends < dist.get_world_size(self.group):
                agree(ValueError(f"this rank's batches ran out after {self.count} while other ranks had more; every "
                                 "rank must get the same number of batches (split a map-style dataset with a "
                                 "DistributedSampler)") if item is _END else None, self.what, self.group)
            ended = ends > 0
        if ended:
            return _END, sums
        self.count += 1
        return item, sums


def agreed_batches(batches: Iterable, what: str = "the data", group=None) -> Iterator:
    """The items of ``batches``, every rank deciding together, before each one is used, whether
    they all have one (:class:`AgreedBatches`: a failure to fetch on any rank, or a rank out of
    batches while others have more, is the same :class:`RankError` on every rank; when every rank
    has run out the iteration ends on all of them). One small all-reduce per batch in a process
    group; ``batches`` as it is without one."""
    agreement = AgreedBatches(batches, what, group)
    while (item := agreement.advance()[0]) is not _END:
        yield item


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
