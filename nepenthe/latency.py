"""Layer 5: latency of a model on one input, and of two models compared fairly (docs/method.md §5).

Built on ``torch.utils.benchmark.Timer`` on CPU, which fixes the thread count for the
measurement; on CUDA devices each timed block is bracketed by CUDA events on the current stream
(:class:`CudaEventTimer`), so that the GPU time of the block is measured, not the host's. We add
warm-up, repeated blocks (the spread is over blocks, each of ``number`` calls), median / IQR in
milliseconds, and, for comparisons, blocks of the two models interleaved (ABBA) so that drift of
the machine (frequency, other load) hits both alike.

A result whose blocks spread widely says so: ``noisy`` is set (and a RuntimeWarning names the
spread) when the IQR exceeds :data:`NOISY_IQR_OVER_MEDIAN` of the median or the median exceeds
:data:`NOISY_MEDIAN_OVER_MIN` times the fastest block. On a quiet machine blocks agree within a few
per cent; a loaded one (other processes, more threads than free cores) gave medians of 656 ms for
a model whose fastest block took 38 ms (issue 14 item 11), a number that only looked like a result.
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.utils.benchmark import Timer

from ._utils import as_args
from .environment import device_name

__all__ = ["compare_calls", "compare_latency", "CudaEventTimer", "latency", "LatencyResult", "NOISY_IQR_OVER_MEDIAN",
           "NOISY_MEDIAN_OVER_MIN"]

NOISY_IQR_OVER_MEDIAN = 0.2  # IQR / median above this: the blocks disagree
NOISY_MEDIAN_OVER_MIN = 1.5  # median / fastest block above this: most blocks waited for something


@dataclass
class LatencyResult:
    """Per-call latency in milliseconds over ``repeats`` blocks of ``number`` calls. ``noisy``: the
    blocks spread too widely for the median to be trusted (``noise`` says how; empty otherwise)."""

    median_ms: float
    iqr_ms: float
    min_ms: float
    max_ms: float
    mean_ms: float
    repeats: int
    number: int
    threads: int
    device: str
    samples_ms: list[float]
    noisy: bool = False
    noise: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _prepare(model: nn.Module, example_input, device: torch.device | None):
    params = next(model.parameters(), None)
    device = device or (params.device if params is not None else torch.device("cpu"))
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in as_args(example_input))
    return model.to(device).eval(), args, device


@dataclass
class _Block:
    """Seconds per call of one timed block (the fields of ``torch.utils.benchmark.Measurement`` used here)."""

    mean: float

    @property
    def median(self) -> float:
        return self.mean


class CudaEventTimer:
    """Times blocks of calls of ``fn`` with CUDA events; ``timeit(number).mean`` is seconds per call.

    The same interface as the part of ``torch.utils.benchmark.Timer`` used here. The device is
    synchronised before each block (so that earlier work is not counted) and the end event is
    waited for; the elapsed time is the GPU's, between the two events on the current stream.
    """

    def __init__(self, fn: Callable[[], object], device: torch.device, threads: int, no_grad: bool = True):
        self.fn, self.device, self.threads, self.no_grad = fn, device, threads, no_grad

    def timeit(self, number: int) -> _Block:
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.cuda.device(self.device), torch.no_grad() if self.no_grad else nullcontext():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(self.device)
                start.record()
                for _ in range(number):
                    self.fn()
                end.record()
                end.synchronize()
                return _Block(mean=start.elapsed_time(end) / 1e3 / number)
        finally:
            torch.set_num_threads(before)


def _timer(model: nn.Module, args: tuple, threads: int, device: torch.device | None = None):
    if device is not None and device.type == "cuda":
        return CudaEventTimer(lambda: model(*args), device, threads)
    # no_grad in the statement itself: Timer runs it in its own scope
    return Timer(stmt="with torch.no_grad(): model(*args)", globals={"model": model, "args": args, "torch": torch},
                 num_threads=threads)


def _auto_number(timer: Timer, target_s: float = 0.02) -> int:
    """Calls per block so that one block takes about ``target_s`` (at least one call)."""
    once = timer.timeit(1).median
    return max(1, min(10_000, int(target_s / max(once, 1e-7))))


def _summarise(block_means_s: Sequence[float], number: int, threads: int, device: torch.device) -> LatencyResult:
    ms = [t * 1e3 for t in block_means_s]
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0], ms[0], ms[0]]
    median, iqr, fastest = statistics.median(ms), q[2] - q[0], min(ms)
    return LatencyResult(median_ms=median, iqr_ms=iqr, min_ms=fastest, max_ms=max(ms), mean_ms=statistics.fmean(ms),
                         repeats=len(ms), number=number, threads=threads, device=device_name(device), samples_ms=ms,
                         **_noise(median, iqr, fastest))


def _noise(median: float, iqr: float, fastest: float) -> dict:
    """``noisy`` / ``noise`` of a result: which spread threshold its blocks passed, if any."""
    why = []
    if median > 0 and iqr > NOISY_IQR_OVER_MEDIAN * median:
        why.append(f"IQR {iqr / median:.0%} of the median (limit {NOISY_IQR_OVER_MEDIAN:.0%})")
    if fastest > 0 and median > NOISY_MEDIAN_OVER_MIN * fastest:
        why.append(f"median {median / fastest:.1f}x the fastest block (limit {NOISY_MEDIAN_OVER_MIN}x)")
    return {"noisy": bool(why), "noise": "; ".join(why)}


def _warn_if_noisy(results: Mapping[str, LatencyResult], stacklevel: int = 3) -> None:
    noisy = {name: r for name, r in results.items() if r.noisy}
    if noisy:
        what = "; ".join(f"{name}: {r.median_ms:.3f} ms median, {r.noise}" for name, r in noisy.items())
        warnings.warn(f"noisy latency ({what}): the machine was busy (other processes, or more threads than free "
                      f"cores), so these medians are unreliable; rerun on a quiet machine or with fewer threads",
                      RuntimeWarning, stacklevel=stacklevel)


def latency(model: nn.Module, example_input, *, warmup: int = 5, repeats: int = 20, number: int | None = None,
            threads: int | None = None, device: torch.device | str | None = None) -> LatencyResult:
    """Median latency of ``model(example_input)`` in eval mode without gradients.

    ``threads`` fixes the intra-op thread count during the measurement (default: the current
    ``torch.get_num_threads()``); ``number`` calls per block (default: blocks of about 20 ms).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    model, args, dev = _prepare(model, example_input, torch.device(device) if device else None)
    threads = threads or torch.get_num_threads()
    timer = _timer(model, args, threads, dev)
    if warmup:
        timer.timeit(warmup)
    number = number or _auto_number(timer)
    result = _summarise([timer.timeit(number).mean for _ in range(repeats)], number, threads, dev)
    _warn_if_noisy({"model": result})
    return result


def compare_latency(before: nn.Module, after: nn.Module, example_input, *, warmup: int = 5, repeats: int = 20,
                    threads: int | None = None, device: torch.device | str | None = None
                    ) -> tuple[LatencyResult, LatencyResult]:
    """Latency of two models on the same input, timing blocks interleaved in ABBA order."""
    m1, args, dev = _prepare(before, example_input, torch.device(device) if device else None)
    m2, _, _ = _prepare(after, example_input, dev)
    threads = threads or torch.get_num_threads()
    results = _interleaved([_timer(m1, args, threads, dev), _timer(m2, args, threads, dev)], warmup, repeats, threads,
                           dev)
    _warn_if_noisy({"before": results[0], "after": results[1]})
    return results[0], results[1]


def compare_calls(calls: Mapping[str, Callable[[], object]], *, warmup: int = 5, repeats: int = 20,
                  threads: int | None = None, device: torch.device | str = "cpu") -> dict[str, LatencyResult]:
    """Latency of several zero-argument callables (e.g. a fused op and the plain PyTorch way),
    timing blocks interleaved with the order rotating each round, the same calls per block for all."""
    threads = threads or torch.get_num_threads()
    device = torch.device(device)
    if device.type == "cuda":
        timers = [CudaEventTimer(fn, device, threads, no_grad=False) for fn in calls.values()]
    else:
        timers = [Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads) for fn in calls.values()]
    results = dict(zip(calls, _interleaved(timers, warmup, repeats, threads, device)))
    _warn_if_noisy(results)
    return results


def _interleaved(timers: list[Timer], warmup: int, repeats: int, threads: int,
                 device: torch.device) -> list[LatencyResult]:
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup:
        for t in timers:
            t.timeit(warmup)
    number = _auto_number(timers[0])  # the same number of calls per block for all
    samples: list[list[float]] = [[] for _ in timers]
    for i in range(repeats):
        # rotate (ABBA for two): whichever runs after another inherits its cache and allocator
        # state, so no callable is always first or always last
        order = list(range(len(timers)))
        order = order[i % len(order):] + order[: i % len(order)]
        if (i // len(order)) % 2:
            order.reverse()
        for k in order:
            samples[k].append(timers[k].timeit(number).mean)
    return [_summarise(s, number, threads, device) for s in samples]
