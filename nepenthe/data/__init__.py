"""Datasets used by nepenthe's experiments, read from their published on-disk formats, never downloaded.

* ``digits``: scikit-learn's bundled 8x8 digits, no files (stratified 72 / 8 / 20 split).
* ``fashion_mnist``: IDX files (:mod:`.idx`), by default those of the Debian package
  ``dataset-fashion-mnist``; train file -> train / val, t10k -> test.
* ``cifar10``, ``cifar100``: the official python-version pickles in ``cifar-10-batches-py/`` /
  ``cifar-100-python/`` (:mod:`.cifar`); fine or coarse CIFAR-100 labels.
* ``tiny_imagenet``: the ``tiny-imagenet-200/`` folder (:mod:`.tiny`); ``val/`` is the test split.
* ``pacs``, ``vlcs``: DomainBed folders ``<domain>/<class>/*.jpg`` (:mod:`.domainbed`); random
  80 / 10 / 10 or leave-one-domain-out.
* ``image_folder``: any torchvision-style ``<class>/*.jpg`` folder, optionally with ``train/``,
  ``val/``, ``test/`` subfolders (:mod:`.images`).

:func:`load_dataset` returns a :class:`DataSplits` with deterministic (seeded) train / val / test splits,
standardized with statistics of the train split only. Every split gives ``(float32 [B, C, H, W],
int64 [B])`` batches through :func:`make_loader`. A missing or malformed dataset raises
:class:`DatasetError` saying which files are expected and where to get them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset

from . import augment as _augment
from .augment import Augment
from .cifar import load_cifar10, load_cifar100
from .dataset import Batch, ImageTensorDataset, collate
from .digits import load_digits
from .domainbed import PACS, VLCS, load_domainbed
from .idx import FASHION_MNIST_DIR, load_fashion_mnist, read_idx, write_idx
from .images import load_image_folder
from .splits import DatasetError, DataSplits
from .tiny import load_tiny_imagenet

__all__ = [
    "FASHION_MNIST_DIR",
    "Augment",
    "Batch",
    "DataSplits",
    "DatasetError",
    "ImageTensorDataset",
    "available_datasets",
    "collate",
    "load_dataset",
    "make_loader",
    "read_idx",
    "unaugmented",
    "write_idx",
]


@dataclass(frozen=True)
class _Entry:
    loader: Callable[..., DataSplits]
    options: tuple[str, ...] = ()  # keyword options of load_dataset this dataset accepts
    augment: Augment | None = None  # what augment=True means for it


_DATASETS: dict[str, _Entry] = {
    "digits": _Entry(load_digits),
    "fashion_mnist": _Entry(load_fashion_mnist),
    "cifar10": _Entry(load_cifar10, ("augment",), _augment.CIFAR),
    "cifar100": _Entry(load_cifar100, ("augment", "coarse_labels"), _augment.CIFAR),
    "tiny_imagenet": _Entry(load_tiny_imagenet, ("augment", "image_size"), _augment.TINY_IMAGENET),
    "pacs": _Entry(partial(load_domainbed, PACS), ("augment", "image_size", "test_domain"), _augment.FOLDER),
    "vlcs": _Entry(partial(load_domainbed, VLCS), ("augment", "image_size", "test_domain"), _augment.FOLDER),
    "image_folder": _Entry(load_image_folder, ("augment", "image_size"), _augment.FOLDER),
}


def unaugmented(dataset: Dataset) -> Dataset:
    """``dataset`` without training-time augmentation (itself when it has none): calibration data
    Ξ is measured as it is (docs/method.md §1), while the training loader may augment."""
    return dataset.unaugmented() if isinstance(dataset, ImageTensorDataset) and dataset.augment else dataset


def available_datasets() -> tuple[str, ...]:
    """Names accepted by :func:`load_dataset`."""
    return tuple(_DATASETS)


def load_dataset(
    name: str,
    root: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
    *,
    augment: bool | Augment = False,
    image_size: int | None = None,
    test_domain: str | None = None,
    coarse_labels: bool = False,
) -> DataSplits:
    """Load dataset ``name`` as deterministic, standardized train / val / test splits.

    Args:
        name: one of :func:`available_datasets`.
        root: folder holding the files (see each dataset's layout in this package's docstring); for
            ``cifar10`` / ``cifar100`` / ``tiny_imagenet`` / ``pacs`` / ``vlcs`` the extracted folder or
            the folder containing it. ``fashion_mnist`` defaults to the Debian location; ``digits``
            ignores it.
        val_fraction: share held out for validation, in ``[0, 1)``: of the official train split
            (digits: of what is left after its 20 % test split), or, for ``pacs`` / ``vlcs`` /
            flat ``image_folder`` s, of the whole dataset (80 / 10 / 10 by default).
        seed: seed of the splits and of the augmentation generator; same seed, same data.
        limit: keep only the first ``limit`` samples of each split (image files past it are not decoded).
        augment: train-split augmentation for the image datasets: True for the dataset's recipe
            (CIFAR: 4-pixel padded random crop + flip; Tiny-ImageNet: 8-pixel; PACS / VLCS / folders:
            flip + random resized crop of 70-100 % of the area), or an :class:`Augment`.
        image_size: side images are resized to (``tiny_imagenet``: default 64, ``pacs`` / ``vlcs`` /
            ``image_folder``: default 224).
        test_domain: ``pacs`` / ``vlcs`` only: that domain is the test split (leave-one-domain-out).
        coarse_labels: ``cifar100`` only: the 20 superclass labels instead of the 100 fine ones.

    Raises:
        ValueError: unknown ``name``, an option the dataset does not take, or invalid arguments.
        DatasetError: the data is missing or malformed (the message says what is expected and how to fix it).
    """
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}")
    if not isinstance(augment, (bool, Augment)):
        raise ValueError(f"augment must be True, False or an Augment, got {augment!r}")
    entry = _DATASETS[name]
    given = {"augment": augment, "image_size": image_size, "test_domain": test_domain, "coarse_labels": coarse_labels}
    given = {key: value for key, value in given.items() if value is not None and value is not False}
    unsupported = sorted(set(given) - set(entry.options))
    if unsupported:
        accepted = ", ".join(entry.options) or "none"
        raise ValueError(f"{name} does not take {', '.join(unsupported)} (its options: {accepted})")
    if given.get("augment") is True:
        given["augment"] = entry.augment
    return entry.loader(root, val_fraction=val_fraction, seed=seed, limit=limit, **given)


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
    Image splits are fetched a whole batch at a time (``__getitems__``) and passed through :func:`collate`.
    """
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=0,
        drop_last=drop_last,
        generator=generator,
        collate_fn=collate,
    )
