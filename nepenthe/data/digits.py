"""``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, no files needed)."""

from __future__ import annotations

import numpy as np

from .splits import DatasetError, DataSplits, build_tensor_splits, holdout_split

__all__ = ["load_digits"]


def load_digits(root: str | None, *, val_fraction: float, seed: int, limit: int | None) -> DataSplits:
    """Stratified 20 % test, then ``val_fraction`` of the rest as val.

    ``root`` is ignored: the data ships inside the scikit-learn wheel.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:
        raise DatasetError("digits needs scikit-learn (pip install scikit-learn)") from exc

    bunch = sklearn_digits()
    # Pixels are integer intensities 0..16 stored as float64; uint8 is lossless and feeds pixel_stats.
    images = bunch.images.astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)

    rest, test = holdout_split(labels, 0.2, seed, stratify=True)
    train_pos, val_pos = holdout_split(labels[rest], val_fraction, seed, stratify=True)
    train, val = rest[train_pos], rest[val_pos]
    parts = {key: (images[idx], labels[idx]) for key, idx in (("train", train), ("val", val), ("test", test))}
    return build_tensor_splits("digits", parts, scale=16.0, num_classes=10, limit=limit)
