"""Training-time augmentation of whole batches with plain torch ops (no torchvision needed).

An :class:`Augment` says what to do; :meth:`Augment.pixels` runs on a uint8 ``(B, C, H, W)`` batch
before standardization (random crop from a zero-padded image, horizontal flip) and
:meth:`Augment.floats` on the standardized float batch (random resized crop, bilinear). Every random
number comes from the ``torch.Generator`` passed in, drawn in a fixed order, so a generator seeded the
same way gives the same augmentations batch after batch.

Presets: :data:`CIFAR` (4-pixel padding crop + flip, the usual CIFAR recipe), :data:`TINY_IMAGENET`
(8-pixel padding crop, the same 1/8 of the side, + flip) and :data:`FOLDER` (flip + random resized crop
keeping 70-100 % of the area, DomainBed's recipe without colour jitter) for PACS / VLCS / image folders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["CIFAR", "FOLDER", "TINY_IMAGENET", "Augment", "random_crop", "random_flip", "random_resized_crop"]


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random ``H x W`` crop of ``x`` (B, C, H, W) zero-padded by ``padding`` on every side."""
    if padding <= 0 or len(x) == 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    hp, wp = h + 2 * padding, w + 2 * padding
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    # One gather for the whole batch: flat offsets of the crop's pixels inside each padded image.
    window = (torch.arange(h)[:, None] * wp + torch.arange(w)).view(1, 1, h * w)
    index = (window + (dy * wp + dx).view(n, 1, 1)).expand(n, c, h * w)
    return padded.reshape(n, c, hp * wp).gather(2, index).view(n, c, h, w)


def random_flip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each sample of ``x`` (B, C, H, W) left-right with probability ``p``."""
    if len(x) == 0:
        return x
    flip = torch.rand(len(x), generator=generator) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_resized_crop(
    x: torch.Tensor,
    scale: tuple[float, float],
    generator: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Per-sample crop covering a random ``scale`` share of the area with aspect ratio in ``ratio``,
    resized back to ``x``'s size by bilinear sampling (float ``x`` of shape (B, C, H, W))."""
    n = len(x)
    if n == 0:
        return x
    area = torch.empty(n, dtype=torch.float64).uniform_(scale[0], scale[1], generator=generator)
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.empty(n, dtype=torch.float64).uniform_(log_low, log_high, generator=generator).exp()
    width = (area * aspect).sqrt().clamp(max=1.0)  # fractions of the full width / height
    height = (area / aspect).sqrt().clamp(max=1.0)
    centre = torch.rand(n, 2, dtype=torch.float64, generator=generator) * 2 - 1
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 1, 1] = width, height
    theta[:, 0, 2] = centre[:, 0] * (1 - width)  # keeps the crop inside the image
    theta[:, 1, 2] = centre[:, 1] * (1 - height)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass(frozen=True)
class Augment:
    """A training-time augmentation recipe.

    Args:
        crop_padding: random crop of the original size from the image zero-padded by this many pixels
            (0: no crop).
        flip: mirror left-right with probability 1/2.
        resized_crop_scale: ``(low, high)`` area share of a random resized crop (aspect 3/4 to 4/3),
            or None for none.
    """

    crop_padding: int = 0
    flip: bool = True
    resized_crop_scale: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {self.crop_padding}")
        if self.resized_crop_scale is not None:
            low, high = self.resized_crop_scale
            if not 0 < low <= high <= 1:
                raise ValueError(f"resized_crop_scale must satisfy 0 < low <= high <= 1, got {self.resized_crop_scale}")

    def pixels(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The steps done on uint8 pixels, before standardization: crop from padding, then flip."""
        x = random_crop(x, self.crop_padding, generator)
        return random_flip(x, generator) if self.flip else x

    def floats(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The steps done on the standardized float batch: the random resized crop, if any."""
        if self.resized_crop_scale is None:
            return x
        return random_resized_crop(x, self.resized_crop_scale, generator)


#: CIFAR-10/100: random 32x32 crop from the image padded by 4 pixels, and a horizontal flip.
CIFAR = Augment(crop_padding=4, flip=True)
#: Tiny-ImageNet: random 64x64 crop from the image padded by 8 pixels, and a horizontal flip.
TINY_IMAGENET = Augment(crop_padding=8, flip=True)
#: PACS / VLCS / image folders: horizontal flip and a random resized crop keeping 70-100 % of the area.
FOLDER = Augment(crop_padding=0, flip=True, resized_crop_scale=(0.7, 1.0))
