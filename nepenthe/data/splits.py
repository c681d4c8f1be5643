"""What every loader shares: the error type, :class:`DataSplits`, seeded splits and train-only statistics.

Two kinds of split are built here:

* small grayscale datasets (``digits``, ``fashion_mnist``) become ``TensorDataset`` s of standardized
  float32 inputs (:func:`build_tensor_splits`), as they always have;
* image datasets (CIFAR, Tiny-ImageNet, folders) keep their pixels as uint8 ``(N, C, H, W)`` tensors and
  are standardized per batch by :class:`~nepenthe.data.dataset.ImageTensorDataset`
  (:func:`build_image_splits`).

Every split keeps source order (index arrays are sorted), so ``limit`` takes a well-defined prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ..errors import DatasetError

__all__ = [
    "DataSplits",
    "DatasetError",
    "build_image_splits",
    "build_tensor_splits",
    "channel_stats",
    "holdout_split",
    "pixel_stats",
    "three_way_split",
]



@dataclass
class DataSplits:
    """Train / validation / test splits of one dataset.

    Every split yields ``(float32 inputs of shape input_shape, int64 label in [0, num_classes))`` and
    works with :func:`~nepenthe.data.make_loader`. ``digits`` and ``fashion_mnist`` splits are
    ``TensorDataset`` s; the image datasets' splits are
    :class:`~nepenthe.data.dataset.ImageTensorDataset` s (uint8 pixels in memory, standardized per batch).

    ``mean`` and ``std`` are the train-split statistics of the pixels scaled to ``[0, 1]``, used as
    ``x = (pixel - mean) / std``: plain floats for one-channel data, per-channel tuples otherwise.
    ``classes`` holds the class names when the dataset ships them (index ``i`` is label ``i``).
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    mean: float | tuple[float, ...] = 0.0
    std: float | tuple[float, ...] = 1.0
    classes: tuple[str, ...] = field(default=())

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
# Seeded splits
# --------------------------------------------------------------------------------------------------


def holdout_split(labels: np.ndarray, fraction: float, seed: int, stratify: bool) -> tuple[np.ndarray, np.ndarray]:
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


def three_way_split(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded random (train, val, test) partition of ``range(n)``; the fractions are shares of ``n``.

    With ``val_fraction = test_fraction = 0.1`` this is the 80 / 10 / 10 protocol used for PACS / VLCS.
    Each returned index array is sorted.
    """
    order = np.random.default_rng(seed).permutation(n)
    n_test = round(n * float(test_fraction))
    n_val = round(n * float(val_fraction))
    if n_test + n_val >= n and n > 0:
        raise DatasetError(
            f"only {n} samples: too few to hold out {n_val} for validation and {n_test} for test; "
            "lower val_fraction or add data"
        )
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return np.sort(train), np.sort(val), np.sort(test)


# --------------------------------------------------------------------------------------------------
# Train-split statistics
# --------------------------------------------------------------------------------------------------


def _stats_from_counts(counts: np.ndarray, scale: float) -> tuple[float, float]:
    values = np.arange(len(counts), dtype=np.float64) / scale
    total = counts.sum()
    if total == 0:
        return 0.0, 1.0
    mean = float((counts * values).sum() / total)
    std = float(np.sqrt((counts * (values - mean) ** 2).sum() / total))
    # A constant image set has std 0; leave it unscaled instead of dividing by zero.
    return mean, (std if std > 0 else 1.0)


def pixel_stats(raw: np.ndarray, scale: float) -> tuple[float, float]:
    """Mean and (population) std of ``raw / scale`` for an integer-valued uint8 array.

    Computed from a 256-bin histogram: exact, and it avoids a float64 copy of every pixel
    (Fashion-MNIST's train split alone has 42 million of them).
    """
    return _stats_from_counts(np.bincount(raw.ravel(), minlength=256).astype(np.float64), scale)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``(N, C, H, W)`` images scaled to ``[0, 1]`` (exact, histogram based).

    Works through ``chunk`` images at a time, so the extra memory is one channel of one chunk.
    """
    array = images.numpy()
    counts = np.zeros((array.shape[1], 256), dtype=np.float64)
    for start in range(0, len(array), chunk):
        block = array[start : start + chunk]
        for c in range(array.shape[1]):
            counts[c] += np.bincount(block[:, c].ravel(), minlength=256)
    stats = [_stats_from_counts(row, 255.0) for row in counts]
    return tuple(m for m, _ in stats), tuple(s for _, s in stats)


# --------------------------------------------------------------------------------------------------
# Building DataSplits
# --------------------------------------------------------------------------------------------------


def _to_tensor_dataset(raw: np.ndarray, labels: np.ndarray, scale: float, mean: float, std: float) -> TensorDataset:
    """Scale uint8 images (N, H, W) to [0, 1], standardize, and add the channel axis."""
    x = raw.astype(np.float32)
    # In-place arithmetic keeps peak memory at one float32 copy of the split.
    x /= np.float32(scale)
    x -= np.float32(mean)
    x /= np.float32(std)
    inputs = torch.from_numpy(x).unsqueeze(1)
    return TensorDataset(inputs, torch.from_numpy(labels.astype(np.int64)))


def build_tensor_splits(
    name: str,
    parts: dict[str, tuple[np.ndarray, np.ndarray]],
    scale: float,
    num_classes: int,
    limit: int | None,
) -> DataSplits:
    """Grayscale ``(N, H, W)`` uint8 parts: apply ``limit``, standardize with train statistics, wrap."""
    if limit is not None:
        parts = {key: (raw[:limit], lab[:limit]) for key, (raw, lab) in parts.items()}
    mean, std = pixel_stats(parts["train"][0], scale)
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


def build_image_splits(
    name: str,
    parts: dict[str, tuple[np.ndarray | torch.Tensor, np.ndarray]],
    num_classes: int,
    classes: Sequence[str],
    limit: int | None,
    augment: object | None,
    seed: int,
) -> DataSplits:
    """uint8 ``(N, C, H, W)`` parts: apply ``limit``, take per-channel train statistics, wrap each split.

    ``augment`` (an :class:`~nepenthe.data.augment.Augment` or None) is given to the train split only;
    its random generator is seeded with ``seed``.
    """
    from .dataset import ImageTensorDataset

    tensors = {}
    for key, (images, labels) in parts.items():
        images = torch.as_tensor(images[:limit] if limit is not None else images)
        labels = torch.as_tensor(np.asarray(labels[:limit] if limit is not None else labels, dtype=np.int64))
        if images.dtype != torch.uint8 or images.dim() != 4:
            shape = tuple(images.shape)
            raise TypeError(f"{name} {key}: expected uint8 (N, C, H, W) images, got {images.dtype} {shape}")
        tensors[key] = (images.contiguous(), labels)
    mean, std = channel_stats(tensors["train"][0])
    datasets = {
        key: ImageTensorDataset(images, labels, mean, std, augment=augment if key == "train" else None, seed=seed)
        for key, (images, labels) in tensors.items()
    }
    input_shape = tuple(tensors["train"][0].shape[1:])
    scalar = len(mean) == 1
    return DataSplits(
        name=name,
        train=datasets["train"],
        val=datasets["val"],
        test=datasets["test"],
        num_classes=num_classes,
        input_shape=input_shape,
        mean=mean[0] if scalar else mean,
        std=std[0] if scalar else std,
        classes=tuple(classes),
    )
