"""Image files: decoding with Pillow, class-folder scanning, and the ``image_folder`` loader.

``image_folder`` reads a torchvision-style ImageFolder, either flat or with split subfolders::

    <root>/<class>/*.jpg|jpeg|png|bmp|ppm|pgm|tif|tiff|webp
    <root>/train/<class>/*.jpg ...  [<root>/val/<class>/...]  [<root>/test/<class>/...]

Class indices follow the sorted class-folder names (of ``train/`` when split). A split folder that
is missing is held out of ``train/`` (test: 10 %, val: ``val_fraction``, both shares of ``train/``);
a flat folder is split 80 / 10 / 10 at random (with the default ``val_fraction=0.1``).

Images are converted to RGB and resized (squashed) to ``image_size`` x ``image_size`` with bilinear
filtering once, at load time, on a few threads; the decoded pixels are kept as uint8.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .augment import Augment
from .splits import DatasetError, DataSplits, build_image_splits, three_way_split

__all__ = ["IMAGE_EXTENSIONS", "decode_images", "load_image_folder", "scan_class_folders"]

#: File extensions (lower case) read as images, as torchvision's ImageFolder.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_TEST_SHARE = 0.1  # share held out for test when a dataset ships no test split


def _pillow():
    try:
        from PIL import Image
    except ImportError as exc:
        raise DatasetError("decoding JPEG / PNG images needs Pillow: pip install pillow") from exc
    return Image


def _decode_one(image_module, path: Path, size: int) -> np.ndarray:
    try:
        with image_module.open(path) as image:
            image = image.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), image_module.BILINEAR)
            return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, SyntaxError, ValueError, image_module.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: cannot decode image ({exc})") from exc


def decode_images(paths: Sequence[Path], size: int, threads: int | None = None) -> np.ndarray:
    """Decode ``paths`` into a uint8 ``(N, 3, size, size)`` array (RGB, bilinear resize).

    Pillow releases the GIL while decoding, so a few threads help; a file that cannot be decoded
    raises :class:`DatasetError` naming it.
    """
    image_module = _pillow()
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    if not paths:
        return out

    def work(i: int) -> None:
        out[i] = _decode_one(image_module, paths[i], size)

    threads = threads or min(8, os.cpu_count() or 1)
    if threads == 1 or len(paths) < 64:
        for i in range(len(paths)):
            work(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, range(len(paths)), chunksize=64))
    return out


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _subfolders(folder: Path) -> list[str]:
    """Names of the non-hidden subfolders of ``folder``, sorted."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_class_folders(
    folder: Path, classes: Sequence[str] | None = None, hint: str = ""
) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """``(paths, labels, classes)`` of ``folder/<class>/<image>``, in class then file-name order.

    ``classes`` fixes the class list and label order (a class folder outside it is an error, a class
    without a folder has no samples); by default it is the sorted subfolder names, each of which must
    hold at least one image.
    """
    found = _subfolders(folder)
    require_images = classes is None
    if classes is None:
        if not found:
            raise DatasetError(f"{folder} has no class subfolders; expected {folder}/<class>/<image files>{hint}")
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DatasetError(f"{folder}: class folders {unknown} are not among the classes {list(classes)}{hint}")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        if not (folder / name).is_dir():
            continue
        files = _list_images(folder / name)
        if not files and require_images:
            raise DatasetError(
                f"{folder / name} holds no images (extensions {', '.join(IMAGE_EXTENSIONS)}){hint}"
            )
        paths.extend(files)
        labels.extend([label] * len(files))
    return paths, np.asarray(labels, dtype=np.int64), tuple(classes)


def _image_splits(
    name: str,
    files: dict[str, tuple[list[Path], np.ndarray]],
    classes: Sequence[str],
    *,
    limit: int | None,
    augment: Augment | None,
    image_size: int,
    seed: int,
) -> DataSplits:
    """Decode each split's files (only the first ``limit`` of each) and build the :class:`DataSplits`."""
    parts = {}
    for key, (paths, labels) in files.items():
        if limit is not None:
            paths, labels = paths[:limit], labels[:limit]
        parts[key] = (decode_images(paths, image_size), labels)
    if len(parts["train"][0]) == 0:
        raise DatasetError(f"{name}: the train split is empty")
    return build_image_splits(name, parts, len(classes), classes, limit, augment, seed)


def _take(files: tuple[list[Path], np.ndarray], index: np.ndarray) -> tuple[list[Path], np.ndarray]:
    """The samples at ``index`` of a ``(paths, labels)`` pair."""
    paths, labels = files
    return [paths[i] for i in index], labels[index]


def load_image_folder(
    root: str | None,
    *,
    val_fraction: float,
    seed: int,
    limit: int | None,
    augment: Augment | None = None,
    image_size: int | None = None,
) -> DataSplits:
    """A torchvision-style ImageFolder (flat, or with ``train/`` [``val/``] [``test/``]); see the module doc."""
    size = image_size or 224
    hint = "; pass root=<folder with one subfolder of images per class, or with train/ [val/] [test/] subfolders>"
    if root is None:
        raise DatasetError("image_folder reads a folder of your own: no root given" + hint)
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"dataset folder {base} does not exist{hint}")
    present = {split for split in ("train", "val", "test") if (base / split).is_dir()}
    if present and "train" not in present:
        raise DatasetError(f"{base} has {'/, '.join(sorted(present))}/ but no train/ folder{hint}")

    if present:
        paths, labels, classes = scan_class_folders(base / "train", hint=hint)
        train_idx, val_idx, test_idx = three_way_split(
            len(labels), 0.0 if "val" in present else val_fraction, 0.0 if "test" in present else _TEST_SHARE, seed
        )
        files = {
            "train": _take((paths, labels), train_idx),
            "val": _take((paths, labels), val_idx),
            "test": _take((paths, labels), test_idx),
        }
        for split in ("val", "test"):
            if split in present:
                split_paths, split_labels, _ = scan_class_folders(base / split, classes, hint)
                files[split] = (split_paths, split_labels)
    else:
        paths, labels, classes = scan_class_folders(base, hint=hint)
        train_idx, val_idx, test_idx = three_way_split(len(labels), val_fraction, _TEST_SHARE, seed)
        files = {key: _take((paths, labels), idx) for key, idx in
                 (("train", train_idx), ("val", val_idx), ("test", test_idx))}
    return _image_splits("image_folder", files, classes, limit=limit, augment=augment, image_size=size, seed=seed)
