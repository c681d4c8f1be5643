"""What a tensor archive (``weights.pt`` / ``constants.pt``) holds, read before any tensor is: the
zip directory is bounded, and the pickle is replayed with stand-ins that record each tensor's
dtype, shape, strides and storage instead of allocating it. :func:`~nepenthe.fold.load` compares
that against the recipe, and only then lets ``torch.load(weights_only=True)`` allocate.

Accepted: dense (strided) tensors of :data:`WEIGHT_DTYPES`, each covering its own storage exactly
(several names for one tensor, i.e. tied weights, are fine); storages stored uncompressed, the
entries adding up to no more than the file. Everything else is a :class:`RecipeError` naming the
file and the tensor.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import RecipeError

__all__ = []

# float64 is accepted like the other floating types: a model folded in double precision is saved and
# loaded in double precision (never converted). Complex, quantized, float8 and unsigned >8-bit
# types are refused: no folded model holds them, and load would hand them to modules that cannot.
WEIGHT_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32,
                 torch.int16, torch.int8, torch.uint8, torch.bool}

_STORAGES = {f"{name}Storage": dtype for name, dtype in
             [("Float", torch.float32), ("Double", torch.float64), ("Half", torch.float16),
              ("BFloat16", torch.bfloat16), ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16),
              ("Char", torch.int8), ("Byte", torch.uint8), ("Bool", torch.bool)]}

MAX_PICKLE_BYTES = 16 * 2**20  # the index of tensors, not the tensors: ~100 bytes a tensor


@dataclass(frozen=True)
class _TensorMeta:
    """One tensor of an archive as its pickle describes it (nothing allocated)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    storage: str
    storage_numel: int

    def meta(self) -> torch.Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device="meta")


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _ints(value, what: str) -> tuple[int, ...]:
    if not (isinstance(value, tuple) and all(type(v) is int and 0 <= v < 2**62 for v in value)):
        raise ValueError(f"{what} {value!r} is not a tuple of non-negative ints")
    return value


def _rebuild(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> _TensorMeta:
    """Stand-in for torch._utils._rebuild_tensor_v2: records, allocates nothing."""
    if not isinstance(storage, _Storage):
        raise ValueError("a tensor without a storage record")
    if hooks or metadata:
        raise ValueError("a tensor with backward hooks or Python metadata (torch.save of a plain tensor has none)")
    size, stride = _ints(size, "shape"), _ints(stride, "stride")
    if type(offset) is not int or offset < 0 or len(size) != len(stride) or len(size) > 16:
        raise ValueError(f"malformed tensor header (offset {offset!r}, shape {size}, stride {stride})")
    return _TensorMeta(storage.dtype, size, stride, offset, storage.key, storage.numel)


class _Replay(pickle.Unpickler):
    """Replays torch.save's pickle; every name it may look up is one of the stand-ins above."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict  # a tensor's (empty) hooks, or an OrderedDict state_dict
        if module == "torch" and name in _STORAGES:
            return _StorageType(_STORAGES[name])
        what = "a sparse or quantized tensor" if "sparse" in name or "qtensor" in name else f"{module}.{name}"
        raise ValueError(f"it refers to {what}; nepenthe.save writes dense tensors of "
                         f"{sorted(str(d).removeprefix('torch.') for d in WEIGHT_DTYPES)} only")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and type(pid[4]) is int and 0 <= pid[4] < 2**62):
            raise ValueError(f"malformed storage record {pid!r:.100}")
        return _Storage(pid[2], pid[1].dtype, pid[4])


def _dense(meta: _TensorMeta) -> bool:
    """The tensor covers its storage exactly: offset 0, as many elements, no gaps nor overlaps
    (any dim order, e.g. channels_last)."""
    numel = 1
    for s in meta.shape:
        numel *= s
    if meta.offset != 0 or numel != meta.storage_numel:
        return False
    expected = 1
    for size, stride in sorted((d for d in zip(meta.shape, meta.stride) if d[0] != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _zip_directory(path: Path, max_entries: int) -> list[zipfile.ZipInfo]:
    """The archive's entries, refusing a directory with more than ``max_entries`` before parsing it
    (its size is read from the end record), compressed entries and entries adding up to more than
    the file (overlapping entries: the stored-entry zip bomb)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - 42))
        tail = f.read(42)
        if tail[-22:-18] != b"PK\x05\x06":  # torch.save writes no archive comment after the end record
            raise RecipeError(f"{path} does not end with a zip end record, so torch.save did not write it; save "
                              "the model again with nepenthe.save")
        entries, directory = struct.unpack("<10xHI", tail[-22:-6])
        if (entries == 0xFFFF or directory == 0xFFFFFFFF) and tail[:4] == b"PK\x06\x07":  # zip64: real counts there
            f.seek(min(struct.unpack("<8xQ", tail[:16])[0], size))
            record = f.read(48)
            entries, directory = struct.unpack("<32xQQ", record) if record[:4] == b"PK\x06\x06" else (-1, -1)
    if not 0 <= entries <= max_entries or directory > 512 * max_entries:
        raise RecipeError(f"{path} lists {entries} entries ({directory} bytes of zip directory), more than the "
                          f"{max_entries} its recipe allows; it was altered: refused before reading it")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise RecipeError(f"{path} is not a torch.save archive ({exc}); save the model again with "
                          "nepenthe.save") from None
    if len(infos) > max_entries:
        raise RecipeError(f"{path} holds {len(infos)} entries, more than the {max_entries} its recipe allows")
    packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED or i.file_size != i.compress_size]
    if packed:
        raise RecipeError(f"{path} has compressed entries ({packed[:3]}); torch.save never compresses, so it was "
                          "altered: refused before reading")
    if sum(i.file_size for i in infos) > size:
        raise RecipeError(f"{path}: its entries add up to more than the file ({size} bytes), i.e. they overlap "
                          "(a zip bomb); refused before reading")
    return infos


def _scan_archive(path: Path, max_entries: int) -> dict[str, _TensorMeta]:
    """Name -> :class:`_TensorMeta` of every tensor in the torch.save archive ``path``, checked as the
    module doc says; nothing is allocated but the pickle's own small objects."""
    infos = _zip_directory(path, max_entries)
    pickles = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
    if len(pickles) != 1:
        raise RecipeError(f"{path} has {len(pickles)} data.pkl entries, not one; save the model again with "
                          "nepenthe.save")
    prefix = pickles[0].filename.removesuffix("data.pkl")
    if pickles[0].file_size > MAX_PICKLE_BYTES:
        raise RecipeError(f"{path}: its index of tensors (data.pkl) is {pickles[0].file_size} bytes, over the "
                          f"{MAX_PICKLE_BYTES} a saved model needs; it was altered")
    with zipfile.ZipFile(path) as archive:
        raw = archive.read(pickles[0])
    try:
        data = _Replay(io.BytesIO(raw)).load()
    except RecipeError:
        raise
    except Exception as exc:  # a malformed pickle may fail in any way; nothing was run or allocated
        raise RecipeError(f"{path} cannot be read as a dict of plain tensors: {type(exc).__name__}: "
                          f"{str(exc)[:300]}; it was not written by nepenthe.save or was altered") from None
    if not (isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, _TensorMeta) for k, v in data.items())):
        raise RecipeError(f"{path} must hold a dict of named tensors")
    sizes = {i.filename.removeprefix(prefix + "data/"): i.file_size for i in infos
             if i.filename.startswith(prefix + "data/")}
    views: dict[str, tuple[str, _TensorMeta]] = {}
    for key, meta in data.items():
        if meta.dtype not in WEIGHT_DTYPES:
            raise RecipeError(f"tensor {key!r} in {path} is {meta.dtype}, which saved models may not hold")
        nbytes = meta.storage_numel * meta.dtype.itemsize
        if sizes.get(meta.storage) != nbytes:
            raise RecipeError(f"tensor {key!r} in {path}: its storage record {meta.storage!r} holds "
                              f"{sizes.get(meta.storage)} bytes, not the {nbytes} its header says; the file was "
                              "altered")
        if not _dense(meta):
            raise RecipeError(f"tensor {key!r} in {path} is a view (offset {meta.offset}, shape {list(meta.shape)}, "
                              f"stride {list(meta.stride)}) of a storage of {meta.storage_numel} elements; "
                              "nepenthe.save writes each tensor with its own storage: save the model again")
        other = views.setdefault(meta.storage, (key, meta))
        if other[1] != meta:
            raise RecipeError(f"tensors {other[0]!r} and {key!r} in {path} share storage {meta.storage!r} as different "
                              "views, so writing one would change the other; save the model again")
    return data


def _check_loaded(path: Path, loaded: dict[str, torch.Tensor], scanned: dict[str, _TensorMeta]) -> None:
    """What torch.load returned is what the scan promised (defence in depth: the scan decided)."""
    for key, meta in scanned.items():
        t = loaded.get(key)
        if not (isinstance(t, torch.Tensor) and t.layout == torch.strided and t.dtype == meta.dtype
                and tuple(t.shape) == meta.shape and not t.is_quantized):
            raise RecipeError(f"tensor {key!r} of {path} read back differently than its header says; the file "
                              "was altered")
    if loaded.keys() != scanned.keys():
        raise RecipeError(f"{path} read back other tensors than its header lists; the file was altered")


def _own_storages(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` detached on the CPU, each covering its own storage exactly (a view into a larger
    storage, e.g. channels narrowed by folding, is copied; several names for one tensor stay one),
    as :func:`_scan_archive` requires."""
    out, seen = {}, {}
    for key, t in tensors.items():
        t = t.detach().cpu()
        meta = _TensorMeta(t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset(), "",
                          t.untyped_storage().nbytes() // max(t.element_size(), 1))
        first = seen.setdefault(t.untyped_storage().data_ptr(), meta)
        out[key] = t if _dense(meta) and first == meta else t.clone(memory_format=torch.contiguous_format)
    return out
