"""CIFAR-10 and CIFAR-100 from the official "python version" pickles, read with a restricted unpickler.

On-disk layout (``root`` may be the extracted folder or the folder containing it)::

    cifar-10-batches-py/data_batch_1 ... data_batch_5   dicts {b'data': uint8 (10000, 3072), b'labels': [int]}
    cifar-10-batches-py/test_batch                       same keys, 10000 images
    cifar-10-batches-py/batches.meta                     {b'label_names': [bytes] * 10}

    cifar-100-python/train    {b'data': uint8 (50000, 3072), b'fine_labels': [int], b'coarse_labels': [int]}
    cifar-100-python/test     same keys, 10000 images
    cifar-100-python/meta     {b'fine_label_names': [bytes] * 100, b'coarse_label_names': [bytes] * 20}

A row of ``data`` is 1024 red, then 1024 green, then 1024 blue values of a row-major 32x32 image.
The official train batches are split into train / val; the test batch is the test split.

Unpickling can run arbitrary code, and these files come from a user folder: :func:`read_pickle`
resolves only the few numpy / builtin names such files need and refuses anything else.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np

from .augment import Augment
from .splits import DatasetError, DataSplits, build_image_splits, holdout_split

__all__ = ["load_cifar10", "load_cifar100", "read_pickle"]

_SITE = "https://www.cs.toronto.edu/~kriz/cifar.html"
_CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
_CIFAR100_FILES = ("train", "test", "meta")


def _allowed_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR pickle may name: numpy array / dtype / scalar reconstruction and bytes."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy(._)core.multiarray._reconstruct
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # numpy(._)core.numeric._frombuffer (protocol 5)
    scalar = np.float64(0).__reduce__()[0]  # numpy(._)core.multiarray.scalar
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol 2 stores bytes when written by Python 3
        ("builtins", "bytearray"): bytearray,
    }
    for core in ("numpy.core", "numpy._core"):  # numpy 1 writes numpy.core, numpy 2 numpy._core
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path) -> None:
        super().__init__(file, encoding="bytes")  # Python 2 str -> bytes, as the official files need
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DatasetError(
                f"{self._path}: refusing to unpickle {module}.{name}: a CIFAR batch holds only dicts, lists, "
                "bytes, ints and numpy arrays, so this file is not one (or was tampered with)"
            ) from None


def read_pickle(path: str | Path) -> dict[str, object]:
    """Read a CIFAR-style pickled dict with the restricted unpickler; keys are returned as ``str``.

    Raises :class:`DatasetError` naming the file when it cannot be read, is not a pickled dict, or
    names any global other than numpy array reconstruction (nothing of such a file is executed).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, path).load()
    except DatasetError:
        raise
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, TypeError ...: all mean a corrupt file
        raise DatasetError(f"{path}: corrupt or not a CIFAR pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {key.decode("latin1") if isinstance(key, bytes) else str(key): value for key, value in obj.items()}


def _locate(root: str | None, folder: str, files: tuple[str, ...], archive: str) -> Path:
    """The extracted folder, given ``root`` = that folder or its parent; else a DatasetError saying what to do."""
    hint = (
        f"download {archive} from {_SITE}, extract it (tar xzf {archive}), "
        f"and pass root=<folder containing {folder}>"
    )
    expected = f"{folder}/{{{', '.join(files)}}}"
    if root is None:
        raise DatasetError(f"no root given: this dataset is read from {expected}; {hint}")
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"dataset folder {base} does not exist; {hint}")
    candidates = [base / folder, base] if base.name != folder else [base]
    for candidate in candidates:
        if candidate.is_dir() and any((candidate / name).is_file() for name in files):
            missing = [name for name in files if not (candidate / name).is_file()]
            if missing:
                raise DatasetError(f"{candidate} lacks {', '.join(missing)}; expected {expected}; {hint}")
            return candidate
    if (base / archive).is_file():
        raise DatasetError(f"{base / archive} is not extracted: run tar xzf {archive} in {base}, then pass root={base}")
    raise DatasetError(f"{base} holds neither {folder}/ nor its files; expected {expected}; {hint}")


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 3, 32, 32), labels int64 (N,))`` from one pickled batch, validated."""
    batch = read_pickle(path)
    for key in ("data", label_key):
        if key not in batch:
            raise DatasetError(f"{path}: no b'{key}' entry (keys: {sorted(batch)})")
    data, labels = batch["data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DatasetError(f"{path}: b'data' must be a uint8 (N, 3072) array, got {type(data).__name__} {shape}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: b'{label_key}' is not a list of integers ({exc})") from exc
    if labels.shape != (len(data),):
        raise DatasetError(f"{path}: {len(data)} images but b'{label_key}' has shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{path}: label {labels.max() if labels.max() >= num_classes else labels.min()} "
                           f"outside [0, {num_classes})")
    return data.reshape(-1, 3, 32, 32), labels


def _names(path: Path, key: str, count: int) -> tuple[str, ...]:
    meta = read_pickle(path)
    names = meta.get(key)
    if not isinstance(names, list) or len(names) != count:
        raise DatasetError(f"{path}: b'{key}' must list {count} class names")
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)


def _split(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    classes: tuple[str, ...],
    val_fraction: float,
    seed: int,
    limit: int | None,
    augment: Augment | None,
) -> DataSplits:
    kept, held = holdout_split(train[1], val_fraction, seed, stratify=False)
    parts = {
        "train": (train[0][kept], train[1][kept]),
        "val": (train[0][held], train[1][held]),
        "test": test,
    }
    return build_image_splits(name, parts, len(classes), classes, limit, augment, seed)


def load_cifar10(
    root: str | None, *, val_fraction: float, seed: int, limit: int | None, augment: Augment | None = None
) -> DataSplits:
    """CIFAR-10: ``data_batch_1..5`` split into train / val, ``test_batch`` as test, names from ``batches.meta``."""
    folder = _locate(root, "cifar-10-batches-py", _CIFAR10_FILES, "cifar-10-python.tar.gz")
    classes = _names(folder / "batches.meta", "label_names", 10)
    batches = [_read_batch(folder / f"data_batch_{i}", "labels", 10) for i in range(1, 6)]
    train = (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
    test = _read_batch(folder / "test_batch", "labels", 10)
    return _split("cifar10", train, test, classes, val_fraction, seed, limit, augment)


def load_cifar100(
    root: str | None,
    *,
    val_fraction: float,
    seed: int,
    limit: int | None,
    augment: Augment | None = None,
    coarse_labels: bool = False,
) -> DataSplits:
    """CIFAR-100: ``train`` split into train / val, ``test`` as test; the 100 fine labels, or the 20
    superclasses with ``coarse_labels=True``; names from ``meta``."""
    folder = _locate(root, "cifar-100-python", _CIFAR100_FILES, "cifar-100-python.tar.gz")
    kind, count = ("coarse", 20) if coarse_labels else ("fine", 100)
    classes = _names(folder / "meta", f"{kind}_label_names", count)
    train = _read_batch(folder / "train", f"{kind}_labels", count)
    test = _read_batch(folder / "test", f"{kind}_labels", count)
    return _split("cifar100", train, test, classes, val_fraction, seed, limit, augment)
