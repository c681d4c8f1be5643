"""An in-memory image split: uint8 ``(N, C, H, W)`` pixels, standardized to float32 one batch at a time.

Keeping the decoded pixels as uint8 costs a quarter of float32 (CIFAR-10: 150 MB, Tiny-ImageNet:
1.2 GB). :meth:`ImageTensorDataset.__getitems__` (which torch's ``DataLoader`` calls with a whole
batch of indices) gathers, augments and standardizes the batch with a handful of tensor ops and
returns a :class:`Batch`; :func:`collate` (the ``collate_fn`` of :func:`~nepenthe.data.make_loader`)
hands its tensors through without copying. With torch's default collate a :class:`Batch` still works,
as the list of ``(input, label)`` samples that ``__getitems__`` is documented to return.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from .augment import Augment

__all__ = ["Batch", "ImageTensorDataset", "collate"]


class Batch(Sequence):
    """A fetched batch: ``inputs`` (float32, B x C x H x W) and ``labels`` (int64, B).

    Also a sequence of ``(input, label)`` samples, so torch's default collate stacks it correctly.
    """

    __slots__ = ("inputs", "labels")

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [(self.inputs[j], self.labels[j]) for j in range(*i.indices(len(self)))]
        return self.inputs[i], self.labels[i]


def collate(batch: Any) -> Any:
    """``collate_fn`` that passes a :class:`Batch` through as ``(inputs, labels)``; else torch's default."""
    if isinstance(batch, Batch):
        return batch.inputs, batch.labels
    return default_collate(batch)


class ImageTensorDataset(Dataset):
    """uint8 images and int64 labels held in memory; items are standardized float32 ``(C, H, W)`` tensors.

    Args:
        images: uint8 tensor ``(N, C, H, W)``.
        labels: int64 tensor ``(N,)``.
        mean, std: per-channel statistics of the pixels scaled to ``[0, 1]``; an item is
            ``(pixel / 255 - mean) / std``.
        augment: applied to every fetch when set (give it to the train split only), or None.
        seed: seed of the dataset's own generator, the only source of augmentation randomness: two
            datasets built with the same seed and fetched in the same order augment identically.

    ``augment`` may be reassigned (e.g. set to None to measure statistics on clean training images).
    Fetch from a single process (``num_workers=0``, as :func:`~nepenthe.data.make_loader` does):
    worker processes would each copy the generator and repeat the same augmentations.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        augment: Augment | None = None,
        seed: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (len(images),):
            raise ValueError(f"{len(images)} images but labels of shape {tuple(labels.shape)}")
        channels = images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean / std need {channels} values, got {len(mean)} / {len(std)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)
        # x = pixel * scale - shift  ==  (pixel / 255 - mean) / std
        std_t = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1) / std_t

    def unaugmented(self) -> ImageTensorDataset:
        """The same split without augmentation (a shallow copy sharing the images): what a
        calibration pass should measure while the training loader keeps augmenting."""
        clean = copy.copy(self)
        clean.augment = None
        return clean

    def reseed(self, seed: int) -> None:
        """Restart the augmentation random stream from ``seed``."""
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Standardize uint8 pixels ``(B, C, H, W)`` to float32 with this split's statistics."""
        return pixels.to(torch.float32).mul_(self._scale).sub_(self._shift)

    def fetch(self, indices: Sequence[int] | torch.Tensor, augment: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, labels)`` for ``indices``, augmented (when the split augments and ``augment``)."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        pixels = self.images[index]
        recipe = self.augment if augment else None
        if recipe is not None:
            pixels = recipe.pixels(pixels, self.generator)
        inputs = self.normalize(pixels)
        if recipe is not None:
            inputs = recipe.floats(inputs, self.generator)
        return inputs, self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        return Batch(*self.fetch(indices))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = self.fetch([index])
        return inputs[0], labels[0]

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as ``(float32 inputs, int64 labels)``, never augmented, like ``TensorDataset.tensors``.

        Materializes every input in float32 (4x the uint8 storage): fine for a test split, heavy for
        a large train split; prefer batches from :func:`~nepenthe.data.make_loader`.
        """
        return self.normalize(self.images), self.labels
