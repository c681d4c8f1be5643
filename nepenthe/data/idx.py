"""IDX files (the MNIST / Fashion-MNIST format) and the ``fashion_mnist`` loader.

On-disk layout read by ``fashion_mnist`` (plain or gzipped; ``X.gz`` is preferred to ``X``)::

    <root>/train-images-idx3-ubyte[.gz]   60000 x 28 x 28 uint8
    <root>/train-labels-idx1-ubyte[.gz]   60000 uint8 labels 0..9
    <root>/t10k-images-idx3-ubyte[.gz]    10000 x 28 x 28
    <root>/t10k-labels-idx1-ubyte[.gz]    10000 labels

``root`` defaults to :data:`FASHION_MNIST_DIR`, where the Debian package ``dataset-fashion-mnist``
installs them. The official train file is split into train / val, t10k is the test split.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from .splits import DatasetError, DataSplits, build_tensor_splits, holdout_split

__all__ = ["FASHION_MNIST_DIR", "load_fashion_mnist", "read_idx", "write_idx"]

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


def load_fashion_mnist(root: str | None, *, val_fraction: float, seed: int, limit: int | None) -> DataSplits:
    """Fashion-MNIST from IDX files: official train split into train/val, t10k as test."""
    folder = Path(root) if root is not None else FASHION_MNIST_DIR
    train_images, train_labels = _read_image_label_pair(folder, "train", (28, 28), 10)
    test_images, test_labels = _read_image_label_pair(folder, "t10k", (28, 28), 10)

    # The official train set is class-balanced, so a plain seeded permutation is close to
    # stratified and, unlike stratification, also works on tiny hand-made files.
    train, val = holdout_split(train_labels, val_fraction, seed, stratify=False)
    parts = {
        "train": (train_images[train], train_labels[train]),
        "val": (train_images[val], train_labels[val]),
        "test": (test_images, test_labels),
    }
    return build_tensor_splits("fashion_mnist", parts, scale=255.0, num_classes=10, limit=limit)
