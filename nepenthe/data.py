"""Datasets used by nepenthe's experiments, as ready-to-train tensors.

Two image-classification datasets are supported, both available without any network access:

* ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes).
* ``"fashion_mnist"``: Fashion-MNIST (70000 28x28 images, 10 classes) read from the IDX files that
  the Debian package ``dataset-fashion-mnist`` installs, or from any folder holding the same files.

:func:`load_dataset` returns a :class:`DataSplits` with deterministic train / val / test splits whose
inputs are standardized with statistics computed on the train split only, so that nothing about the
validation or test data leaks into preprocessing.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = [
    "FASHION_MNIST_DIR",
    "DataSplits",
    "DatasetError",
    "available_datasets",
    "load_dataset",
    "make_loader",
    "read_idx",
    "write_idx",
]

#: Where the Debian package ``dataset-fashion-mnist`` installs its files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_FASHION_HINT = (
    "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
    "or pass root=<folder with the IDX files>"
)

# IDX magic number: two zero bytes, a type code (0x08 = unsigned byte) and the number of dimensions.
_IDX_UBYTE = 0x08
_IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dimensions (count, rows, cols)
_LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dimension (count)


class DatasetError(ValueError):
    """A dataset is missing, unreadable or malformed."""


@dataclass
class DataSplits:
    """Train / validation / test splits of one dataset.

    Each split is a ``TensorDataset`` of ``(inputs, labels)`` with float32 inputs of shape
    ``(N, *input_shape)`` and int64 labels in ``[0, num_classes)``. ``mean`` and ``std`` are the
    scalars used for standardization (``x = (pixel_in_[0,1] - mean) / std``), kept so the
    preprocessing can be undone or applied to new data.
    """

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]
    mean: float = 0.0
    std: float = 1.0

    def summary(self) -> dict[str, object]:
        """Sizes, class count and input shape, as a plain dict (handy for logging)."""
        return {
            "name": self.name,
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test),
            "num_classes": self.num_classes,
            "input_shape": tuple(self.input_shape),
            "mean": self.mean,
            "std": self.std,
        }


# --------------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------------


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip-compressed when ``path`` ends with ``.gz``).

    The header is the big-endian magic number ``0x0000 08 <ndim>`` followed by one big-endian uint32
    per dimension, then the raw bytes in C order (the format of the MNIST / Fashion-MNIST files).
    """
    array = np.asarray(array)
    if array.dtype != np.uint8:
        # Refuse rather than cast: a silent cast would wrap values outside 0..255.
        raise ValueError(f"write_idx only writes uint8 arrays, got {array.dtype}; convert explicitly first")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX arrays need 1 to 255 dimensions, got {array.ndim}")
    header = struct.pack(f">I{array.ndim}I", (_IDX_UBYTE << 8) | array.ndim, *array.shape)
    payload = header + np.ascontiguousarray(array).tobytes()
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


def read_idx(path: str | os.PathLike[str], expected_magic: int | None = None) -> np.ndarray:
    """Read a uint8 IDX file (plain or ``.gz``) into a numpy array, validating its structure.

    Raises :class:`DatasetError`, naming the file, when it cannot be read, when its magic number is
    not a uint8 IDX one (or not ``expected_magic``), or when its length disagrees with the header.
    """
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError) as exc:  # includes gzip.BadGzipFile and truncated gzip streams
        raise DatasetError(f"{path}: cannot read IDX file ({exc})") from exc

    if len(data) < 4:
        raise DatasetError(f"{path}: file is {len(data)} bytes, too short for an IDX header")
    (magic,) = struct.unpack(">I", data[:4])
    if expected_magic is not None and magic != expected_magic:
        raise DatasetError(f"{path}: bad magic number {magic} (expected {expected_magic})")
    if magic >> 16 != 0 or (magic >> 8) & 0xFF != _IDX_UBYTE or magic & 0xFF == 0:
        raise DatasetError(f"{path}: bad magic number {magic} (not a uint8 IDX file)")

    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetError(f"{path}: truncated header ({len(data)} bytes, need {header_len} for {ndim} dims)")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    expected_len = header_len + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected_len:
        problem = "truncated" if len(data) < expected_len else "has trailing bytes"
        raise DatasetError(
            f"{path}: file {problem}: header says dims {dims} ({expected_len} bytes) but file has {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def _find_file(folder: Path, stem: str, hint: str) -> Path:
    """Return ``folder/stem.gz`` or, failing that, ``folder/stem``; raise an actionable error if neither."""
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist; {hint}")
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{folder} has neither {stem}.gz nor {stem}; {hint}")


def _read_image_label_pair(
    folder: Path, prefix: str, image_hw: tuple[int, int], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``<prefix>-images-idx3-ubyte`` and ``<prefix>-labels-idx1-ubyte`` and check they agree."""
    image_path = _find_file(folder, f"{prefix}-images-idx3-ubyte", _FASHION_HINT)
    label_path = _find_file(folder, f"{prefix}-labels-idx1-ubyte", _FASHION_HINT)
    images = read_idx(image_path, expected_magic=_IMAGES_MAGIC)
    labels = read_idx(label_path, expected_magic=_LABELS_MAGIC)
    if images.shape[1:] != image_hw:
        raise DatasetError(f"{image_path}: images are {images.shape[1:]}, expected {image_hw}")
    if len(images) != len(labels):
        raise DatasetError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels")
    if labels.size and labels.max() >= num_classes:
        raise DatasetError(f"{label_path}: label {labels.max()} outside [0, {num_classes})")
    return images, labels


# --------------------------------------------------------------------------------------------------
# Splitting and preprocessing
# --------------------------------------------------------------------------------------------------


def _holdout_split(
    labels: np.ndarray, fraction: float, seed: int, stratify: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(len(labels))`` into (kept, held_out) index arrays, both sorted.

    Sorting keeps each split in source order, so ``limit`` takes a well-defined prefix and the
    result does not depend on the order the splitter happens to return.
    """
    indices = np.arange(len(labels))
    if fraction == 0:
        return indices, indices[:0]
    if stratify:
        from sklearn.model_selection import train_test_split

        kept, held = train_test_split(indices, test_size=fraction, random_state=seed, stratify=labels)
    else:
        order = np.random.default_rng(seed).permutation(len(labels))
        n_held = round(len(labels) * float(fraction))
        held, kept = order[:n_held], order[n_held:]
    return np.sort(kept), np.sort(held)


def _pixel_stats(raw: np.ndarray, scale: float) -> tuple[float, float]:
    """Mean and (population) std of ``raw / scale`` for an integer-valued uint8 array.

    Computed from a 256-bin histogram: exact, and it avoids a float64 copy of every pixel
    (Fashion-MNIST's train split alone has 42 million of them).
    """
    counts = np.bincount(raw.ravel(), minlength=256).astype(np.float64)
    values = np.arange(len(counts), dtype=np.float64) / scale
    total = counts.sum()
    if total == 0:
        return 0.0, 1.0
    mean = float((counts * values).sum() / total)
    std = float(np.sqrt((counts * (values - mean) ** 2).sum() / total))
    # A constant image set has std 0; leave it unscaled instead of dividing by zero.
    return mean, (std if std > 0 else 1.0)


def _to_tensor_dataset(
    raw: np.ndarray, labels: np.ndarray, scale: float, mean: float, std: float
) -> TensorDataset:
    """Scale uint8 images (N, H, W) to [0, 1], standardize, and add the channel axis."""
    x = raw.astype(np.float32)
    # In-place arithmetic keeps peak memory at one float32 copy of the split.
    x /= np.float32(scale)
    x -= np.float32(mean)
    x /= np.float32(std)
    inputs = torch.from_numpy(x).unsqueeze(1)
    return TensorDataset(inputs, torch.from_numpy(labels.astype(np.int64)))


def _build_splits(
    name: str,
    parts: dict[str, tuple[np.ndarray, np.ndarray]],
    scale: float,
    num_classes: int,
    limit: int | None,
) -> DataSplits:
    """Apply ``limit``, standardize every split with train statistics and wrap the result."""
    if limit is not None:
        parts = {key: (raw[:limit], lab[:limit]) for key, (raw, lab) in parts.items()}
    mean, std = _pixel_stats(parts["train"][0], scale)
    datasets = {key: _to_tensor_dataset(raw, lab, scale, mean, std) for key, (raw, lab) in parts.items()}
    height, width = parts["train"][0].shape[1:]
    return DataSplits(
        name=name,
        train=datasets["train"],
        val=datasets["val"],
        test=datasets["test"],
        num_classes=num_classes,
        input_shape=(1, height, width),
        mean=mean,
        std=std,
    )


# --------------------------------------------------------------------------------------------------
# Dataset loaders
# --------------------------------------------------------------------------------------------------


def _load_digits(root: str | None, val_fraction: float, seed: int, limit: int | None) -> DataSplits:
    """scikit-learn's 8x8 digits: stratified 20 % test, then ``val_fraction`` of the rest as val.

    ``root`` is ignored: the data ships inside the scikit-learn wheel.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetError("digits needs scikit-learn (pip install scikit-learn)") from exc

    bunch = load_digits()
    # Pixels are integer intensities 0..16 stored as float64; uint8 is lossless and feeds _pixel_stats.
    images = bunch.images.astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)

    rest, test = _holdout_split(labels, 0.2, seed, stratify=True)
    train_pos, val_pos = _holdout_split(labels[rest], val_fraction, seed, stratify=True)
    train, val = rest[train_pos], rest[val_pos]
    parts = {key: (images[idx], labels[idx]) for key, idx in (("train", train), ("val", val), ("test", test))}
    return _build_splits("digits", parts, scale=16.0, num_classes=10, limit=limit)


def _load_fashion_mnist(root: str | None, val_fraction: float, seed: int, limit: int | None) -> DataSplits:
    """Fashion-MNIST from IDX files: official train split into train/val, t10k as test."""
    folder = Path(root) if root is not None else FASHION_MNIST_DIR
    train_images, train_labels = _read_image_label_pair(folder, "train", (28, 28), 10)
    test_images, test_labels = _read_image_label_pair(folder, "t10k", (28, 28), 10)

    # The official train set is class-balanced, so a plain seeded permutation is close to
    # stratified and, unlike stratification, also works on tiny hand-made files.
    train, val = _holdout_split(train_labels, val_fraction, seed, stratify=False)
    parts = {
        "train": (train_images[train], train_labels[train]),
        "val": (train_images[val], train_labels[val]),
        "test": (test_images, test_labels),
    }
    return _build_splits("fashion_mnist", parts, scale=255.0, num_classes=10, limit=limit)


_LOADERS: dict[str, Callable[[str | None, float, int, int | None], DataSplits]] = {
    "digits": _load_digits,
    "fashion_mnist": _load_fashion_mnist,
}


def available_datasets() -> tuple[str, ...]:
    """Names accepted by :func:`load_dataset`."""
    return tuple(_LOADERS)


def load_dataset(
    name: str,
    root: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
) -> DataSplits:
    """Load dataset ``name`` as deterministic, standardized train / val / test splits.

    Args:
        name: one of :func:`available_datasets`.
        root: folder holding the files, for datasets read from disk (default: the Debian location).
        val_fraction: share of the training data held out for validation, in ``[0, 1)``.
        seed: seed of the split; the same seed always gives the same splits.
        limit: if given, keep only the first ``limit`` samples of each split (for quick runs).

    Raises:
        ValueError: unknown ``name`` or invalid arguments.
        DatasetError: the data is missing or malformed (the message says how to fix it).
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit}")
    return _LOADERS[name](root, val_fraction, seed, limit)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A single-process ``DataLoader``; shuffling uses its own seeded generator for reproducibility.

    A private generator (rather than the global RNG) makes the batch order depend only on ``seed``
    and on how many epochs the loader has been iterated, not on unrelated random calls elsewhere.
    """
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=0,
        drop_last=drop_last,
        generator=generator,
    )
