"""Tiny-ImageNet-200 from the folder of the official zip (``tiny-imagenet-200.zip``).

On-disk layout (``root`` may be ``tiny-imagenet-200`` itself or the folder containing it)::

    tiny-imagenet-200/wnids.txt                       the 200 class ids (WordNet ids), one a line
    tiny-imagenet-200/words.txt                       "<wnid>\\t<names>" lines (class names; optional)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG      500 64x64 images per class
    tiny-imagenet-200/val/images/*.JPEG               10000 images
    tiny-imagenet-200/val/val_annotations.txt         "<file>\\t<wnid>\\t<box>" lines

The official ``test/`` folder has no labels, so -- as the EGP paper's code does -- ``val/`` is the test
split and ``val_fraction`` of ``train/`` is held out for validation. Labels follow the sorted wnids
(torchvision ImageFolder order on ``train/``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .augment import Augment
from .images import _image_splits, _list_images, _take
from .splits import DatasetError, DataSplits, holdout_split

__all__ = ["load_tiny_imagenet"]

_FOLDER = "tiny-imagenet-200"
_HINT = (
    "download tiny-imagenet-200.zip from http://cs231n.stanford.edu/tiny-imagenet-200.zip, unzip it, "
    f"and pass root=<folder containing {_FOLDER}>; expected {_FOLDER}/{{wnids.txt, words.txt, "
    "train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt}"
)


def _locate(root: str | None) -> Path:
    if root is None:
        raise DatasetError(f"no root given for tiny_imagenet; {_HINT}")
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"dataset folder {base} does not exist; {_HINT}")
    for candidate in (base / _FOLDER, base):
        if (candidate / "wnids.txt").is_file():
            break
    else:
        if (base / f"{_FOLDER}.zip").is_file():
            raise DatasetError(f"{base / _FOLDER}.zip is not extracted: unzip it in {base}, then pass root={base}")
        raise DatasetError(f"{base} holds neither {_FOLDER}/wnids.txt nor wnids.txt; {_HINT}")
    for needed in ("train", "val/images", "val/val_annotations.txt"):
        if not (candidate / needed).exists():
            raise DatasetError(f"{candidate} lacks {needed}; {_HINT}")
    return candidate


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from exc


def _class_names(folder: Path, wnids: list[str]) -> tuple[str, ...]:
    """Names from ``words.txt`` where it has them, else the wnid itself."""
    words: dict[str, str] = {}
    if (folder / "words.txt").is_file():
        for line in _read_lines(folder / "words.txt"):
            wnid, _, name = line.partition("\t")
            words[wnid] = name.strip() or wnid
    return tuple(words.get(w, w) for w in wnids)


def _train_files(folder: Path, wnids: list[str]) -> tuple[list[Path], np.ndarray]:
    paths: list[Path] = []
    labels: list[int] = []
    for label, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        if not images.is_dir():
            raise DatasetError(f"{images} is missing (class {wnid} of wnids.txt); {_HINT}")
        files = _list_images(images)
        if not files:
            raise DatasetError(f"{images} holds no images; {_HINT}")
        paths.extend(files)
        labels.extend([label] * len(files))
    return paths, np.asarray(labels, dtype=np.int64)


def _val_files(folder: Path, index: dict[str, int]) -> tuple[list[Path], np.ndarray]:
    annotations = folder / "val" / "val_annotations.txt"
    paths: list[Path] = []
    labels: list[int] = []
    for number, line in enumerate(_read_lines(annotations), start=1):
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2:
            raise DatasetError(f"{annotations}: line {number} is not '<file>\\t<wnid>...': {line!r}")
        name, wnid = fields[0], fields[1]
        if wnid not in index:
            raise DatasetError(f"{annotations}: line {number}: class {wnid} is not in wnids.txt")
        path = folder / "val" / "images" / name
        if not path.is_file():
            raise DatasetError(f"{path} is listed in {annotations} (line {number}) but missing")
        paths.append(path)
        labels.append(index[wnid])
    if not paths:
        raise DatasetError(f"{annotations} lists no images; {_HINT}")
    return paths, np.asarray(labels, dtype=np.int64)


def load_tiny_imagenet(
    root: str | None,
    *,
    val_fraction: float,
    seed: int,
    limit: int | None,
    augment: Augment | None = None,
    image_size: int | None = None,
) -> DataSplits:
    """Tiny-ImageNet-200: ``train/`` split into train / val, ``val/`` as test (see the module doc).

    ``image_size`` defaults to the native 64.
    """
    folder = _locate(root)
    wnids = sorted(set(_read_lines(folder / "wnids.txt")))
    if not wnids:
        raise DatasetError(f"{folder / 'wnids.txt'} lists no classes; {_HINT}")
    train = _train_files(folder, wnids)
    test = _val_files(folder, {w: i for i, w in enumerate(wnids)})
    kept, held = holdout_split(train[1], val_fraction, seed, stratify=False)
    files = {"train": _take(train, kept), "val": _take(train, held), "test": test}
    return _image_splits("tiny_imagenet", files, _class_names(folder, wnids), limit=limit, augment=augment,
                        image_size=image_size or 64, seed=seed)
