"""Atomic file writes: a crash mid-write leaves the previous file, never a truncated one; checksums
that tell a damaged checkpoint from a good one; removal of the temporary files a killed write leaves;
the random states a checkpoint carries so that a resumed run draws what an uninterrupted one would."""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError

__all__ = ["atomic_torch_save", "atomic_write_json", "atomic_write_text", "generators_of", "payload_checksum",
           "remove_stale_temporaries", "rng_state", "set_rng_state"]


def _atomic_write(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    return _atomic_write(Path(path), lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return _atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(obj, path: str | os.PathLike) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def _feed(h, obj) -> None:
    """Hash ``obj`` (nested dicts / lists / tuples of tensors and JSON-able values) canonically."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"D")
        for key in sorted(obj, key=str):
            h.update(repr(key).encode())
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(b"L" if isinstance(obj, list) else b"U")
        for item in obj:
            _feed(h, item)
    else:
        h.update(repr(obj).encode())


def payload_checksum(obj) -> str:
    """SHA-256 of a checkpoint payload's content (tensor bytes, dtypes, shapes and every value), the
    ``"checksum"`` key itself left out."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in obj.items() if k != "checksum"} if isinstance(obj, dict) else obj)
    return h.hexdigest()


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files that writes killed mid-way left in ``directory``."""
    removed = []
    for tmp in Path(directory).glob(".*.tmp"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


# ----- random states --------------------------------------------------------------------------------
# Stored as tensors and plain values only, so a checkpoint still loads with weights_only=True; read
# back from an untrusted file, every piece is checked (type, dtype, shape, range) before any is set.

_MT_WORDS = 624  # Mersenne Twister state words (numpy's and Python's global generators)
_CUDA_STATE_BYTES = 16  # torch's Philox state per CUDA device (seed, offset), on a machine without CUDA


def generators_of(sources: Iterable) -> list[torch.Generator]:
    """The distinct ``torch.Generator`` objects of ``sources``: generators themselves, or the ones a
    data loader draws from (its own ``generator=``, its sampler's, and its dataset's ``generator``,
    which nepenthe's augmented image datasets draw augmentations from). A loader with none of them
    draws from torch's global generator, which :func:`rng_state` saves anyway."""
    found: dict[int, torch.Generator] = {}
    for source in sources:
        if isinstance(source, torch.Generator):
            candidates = [source]
        elif any(hasattr(source, name) for name in ("generator", "sampler", "dataset")):
            sampler = getattr(source, "sampler", None)
            batch_sampler = getattr(source, "batch_sampler", None)
            candidates = [getattr(source, "generator", None), getattr(sampler, "generator", None),
                          getattr(getattr(batch_sampler, "sampler", None), "generator", None),
                          getattr(getattr(source, "dataset", None), "generator", None)]
        else:
            raise TypeError(f"rng_generators takes torch.Generator objects or data loaders / samplers, got "
                            f"{type(source).__name__}")
        for g in candidates:
            if isinstance(g, torch.Generator):
                found.setdefault(id(g), g)
    return list(found.values())


def rng_state(generators: Iterable = ()) -> dict:
    """Every random state of this process a later phase may draw from: torch's CPU generator (and each
    CUDA device's, once CUDA is initialized), numpy's and Python's global generators, and those of
    ``generators`` (see :func:`generators_of`), in order."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "words": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next},
        "generators": [g.get_state() for g in generators_of(generators)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _bad(where: str, key: str, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: random state {key!r} {why}. It was not written by this nepenthe or was altered: "
                           "delete the file to resume from the checkpoint before it, or start over (resume=False / "
                           "--no-resume)")


def _tensor(value, where: str, key: str, dtype: torch.dtype, numel: int, words: bool = False) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.dtype != dtype \
            or value.dim() != 1 or value.numel() != numel:
        got = (f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
               else type(value).__name__)
        raise _bad(where, key, f"is {got}, expected a 1-D {dtype} tensor of {numel} elements")
    if words and bool(((value < 0) | (value >= 2**32)).any()):
        raise _bad(where, key, "holds values outside the 32-bit words of a Mersenne Twister state")
    return value.detach().cpu().contiguous()


def _number(value, where: str, key: str, kind: type, low=None, high=None):
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) \
            or (low is not None and not low <= value <= high):
        raise _bad(where, key, f"is {value!r}, expected {'a number' if kind is float else 'an integer'}"
                   + (f" in [{low}, {high}]" if low is not None else ""))
    return kind(value)


def _checked(state, generators: list[torch.Generator], where: str) -> dict:
    """``state`` as the setters take it, or CheckpointError naming what is wrong (nothing set yet)."""
    if not isinstance(state, dict) or not {"torch", "numpy", "python", "generators"} <= set(state):
        raise _bad(where, "rng", "is not a dict with torch, numpy, python and generators entries")
    torch_state = _tensor(state["torch"], where, "torch", torch.uint8, torch.get_rng_state().numel())
    np_state, py_state = state["numpy"], state["python"]
    if not isinstance(np_state, dict) or np_state.get("kind") != "MT19937":
        raise _bad(where, "numpy", "is not numpy's MT19937 state")
    if not isinstance(py_state, dict) or py_state.get("version") != 3:
        raise _bad(where, "python", "is not a version-3 state of Python's random module")
    keys = _tensor(np_state.get("keys"), where, "numpy.keys", torch.int64, _MT_WORDS, words=True)
    numpy_args = ("MT19937", keys.numpy().astype(np.uint32), _number(np_state.get("pos"), where, "numpy.pos", int,
                  0, _MT_WORDS), _number(np_state.get("has_gauss"), where, "numpy.has_gauss", int, 0, 1),
                  _number(np_state.get("gauss"), where, "numpy.gauss", float))
    words = _tensor(py_state.get("words"), where, "python.words", torch.int64, _MT_WORDS + 1, words=True)
    if not 0 <= int(words[-1]) <= _MT_WORDS:
        raise _bad(where, "python.words", f"ends with position {int(words[-1])}, outside [0, {_MT_WORDS}]")
    gauss_next = py_state.get("gauss_next")
    if gauss_next is not None:
        gauss_next = _number(gauss_next, where, "python.gauss_next", float)
    saved = state["generators"]
    if not isinstance(saved, (list, tuple)) or len(saved) != len(generators):
        count = len(saved) if isinstance(saved, (list, tuple)) else "no list of"
        raise CheckpointError(f"{where} holds the states of {count} generator(s), but this run passes "
                              f"{len(generators)} in rng_generators: pass the same generators (data loaders) as "
                              "the run that wrote it, or start over (resume=False / --no-resume)")
    generator_states = []
    for i, (g, value) in enumerate(zip(generators, saved)):
        expected = g.get_state()
        generator_states.append(_tensor(value, where, f"generators[{i}]", expected.dtype, expected.numel()))
    cpu_states = [("torch", torch_state)] + [(f"generators[{i}]", v) for i, (g, v)
                                             in enumerate(zip(generators, generator_states)) if g.device.type == "cpu"]
    for key, value in cpu_states:  # the content too, on a scratch generator: torch refuses an impossible position
        try:
            torch.Generator().set_state(value)
        except RuntimeError as exc:
            raise _bad(where, key, f"is not a valid generator state ({str(exc).splitlines()[0]})") from None
    cuda = state.get("cuda")
    if cuda is not None:
        if not isinstance(cuda, (list, tuple)):
            raise _bad(where, "cuda", "is not a list of per-device states")
        size = torch.cuda.get_rng_state(0).numel() if torch.cuda.is_available() else _CUDA_STATE_BYTES
        cuda = [_tensor(v, where, f"cuda[{i}]", torch.uint8, size) for i, v in enumerate(cuda)]
    return {"torch": torch_state, "numpy": numpy_args, "python": (3, tuple(int(w) for w in words), gauss_next),
            "generators": generator_states, "cuda": cuda}


def set_rng_state(state, generators: Iterable = (), where: str = "checkpoint") -> None:
    """Put back what :func:`rng_state` saved (``generators`` as passed then, in the same order).
    Everything is checked before anything is set: a malformed state is a CheckpointError naming
    ``where`` and the key. CUDA states saved on a machine with other devices than this one are set
    for the devices both have, with a warning: that part of the resumed run cannot be identical."""
    generators = generators_of(generators)
    ok = _checked(state, generators, where)
    torch.set_rng_state(ok["torch"])
    np.random.set_state(ok["numpy"])
    random.setstate(ok["python"])
    for g, value in zip(generators, ok["generators"]):
        g.set_state(value)
    cuda = ok["cuda"]
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda is not None and len(cuda) != here:
        warnings.warn(f"{where} holds the random states of {len(cuda)} CUDA device(s), this machine has {here}: "
                      "random draws on CUDA will differ from the run that wrote it", RuntimeWarning, stacklevel=2)
    for device, value in enumerate((cuda or [])[:here]):
        torch.cuda.set_rng_state(value, device)
