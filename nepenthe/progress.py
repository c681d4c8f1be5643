"""Progress bars: tqdm when installed, on a terminal, and on rank 0; silent otherwise."""

from __future__ import annotations

import os
import sys

__all__ = ["progress_bar", "progress_enabled"]


def progress_enabled() -> bool:
    rank = int(os.environ.get("RANK", "0") or 0)
    return rank == 0 and sys.stderr.isatty()


def progress_bar(iterable=None, *, total=None, desc: str = "", enabled: bool | None = None, **kwargs):
    """A tqdm bar over ``iterable`` (or a manual one with ``total``), or a no-op stand-in."""
    enabled = progress_enabled() if enabled is None else enabled
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional extra ([cli])
        tqdm = None
    if tqdm is None or not enabled:
        return _Silent(iterable)
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, **kwargs)


class _Silent:
    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass
