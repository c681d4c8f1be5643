"""nepenthe.data on tiny files written here in each dataset's real on-disk format.

CIFAR-10/100 python-version pickles (the official key names), Tiny-ImageNet-200 folders with
val_annotations.txt, DomainBed PACS / VLCS folders and torchvision ImageFolders with real JPEG / PNG
files written by Pillow: shapes, labels, split sizes, determinism, train-only statistics, ``limit``,
leave-one-domain-out, and the errors for missing, corrupt and malicious files. Then the batched
augmentation ops and the in-memory image split (batched fetches, reproducible augmentation of the
train split only).
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from nepenthe.data import (
    Augment,
    Batch,
    DatasetError,
    DataSplits,
    ImageTensorDataset,
    collate,
    load_dataset,
    make_loader,
)
from nepenthe.data.augment import random_crop, random_flip, random_resized_crop

Image = pytest.importorskip("PIL.Image")

# --------------------------------------------------------------------------------------------------
# Writers of the real formats
# --------------------------------------------------------------------------------------------------

PER_BATCH, N_CIFAR_TEST = 4, 5  # CIFAR-10: 5 batches of 4 train images, 5 test images


def _rows(ids: np.ndarray) -> np.ndarray:
    base = (np.arange(3072, dtype=np.int64) * 7) % 251
    rows = (base[None, :] + 13 * ids[:, None]) % 256
    rows[:, 0] = ids  # the first red pixel identifies the image
    return rows.astype(np.uint8)


def _py2_str(b: bytes) -> bytes:
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def _py2_pickle(obj) -> bytes:
    """The protocol-2 opcodes Python 2's cPickle writes (str as SHORT_BINSTRING / BINSTRING, numpy 1
    array reconstruction), as in the official CIFAR files; for dicts of bytes / ints / lists / uint8 arrays."""
    if isinstance(obj, dict):
        return b"}(" + b"".join(_py2_pickle(k) + _py2_pickle(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, list):
        return b"](" + b"".join(_py2_pickle(v) for v in obj) + b"e"
    if isinstance(obj, bytes):
        return _py2_str(obj)
    if isinstance(obj, int):
        return b"J" + struct.pack("<i", obj)
    assert isinstance(obj, np.ndarray) and obj.dtype == np.uint8
    shape = b"(" + b"".join(b"J" + struct.pack("<i", d) for d in obj.shape) + b"t"
    dtype = b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"K\x00K\x01\x87R(K\x03" + _py2_str(b"|")
    dtype += b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str(b"b") + b"\x87R"
            + b"(K\x01" + shape + dtype + b"\x89" + _py2_str(obj.tobytes()) + b"tb")


def _dump(path: Path, obj: dict, style: str = "numpy2") -> None:
    """Pickle ``obj`` as written by Python 3 + numpy 2 (protocol 2), by numpy 1 (``numpy.core`` module
    names) or by Python 2 (the official files)."""
    if style == "python2":
        data = b"\x80\x02" + _py2_pickle(obj) + b"."
    else:
        data = pickle.dumps(obj, protocol=2)
        if style == "numpy1":
            data = data.replace(b"numpy._core.", b"numpy.core.")
    path.write_bytes(data)


def write_cifar10(parent: Path, style: str = "numpy2") -> dict[str, np.ndarray]:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_ids = np.arange(5 * PER_BATCH)
    for b in range(5):
        ids = train_ids[b * PER_BATCH : (b + 1) * PER_BATCH]
        _dump(folder / f"data_batch_{b + 1}", {
            b"batch_label": f"training batch {b + 1} of 5".encode(),
            b"labels": [int(i % 10) for i in ids],
            b"data": _rows(ids),
            b"filenames": [f"img_{i}.png".encode() for i in ids],
        }, style)
    test_ids = np.arange(100, 100 + N_CIFAR_TEST)
    _dump(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": [int(i % 10) for i in test_ids],
                                  b"data": _rows(test_ids), b"filenames": [b"t"] * N_CIFAR_TEST}, style)
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer",
                                  "dog", "frog", "horse", "ship", "truck")]
    _dump(folder / "batches.meta", {b"num_cases_per_batch": PER_BATCH, b"label_names": names, b"num_vis": 3072},
          style)
    return {"train": _rows(train_ids), "train_labels": train_ids % 10, "test": _rows(test_ids),
            "test_labels": test_ids % 10}


def write_cifar100(parent: Path) -> None:
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, ids in (("train", np.arange(12)), ("test", np.arange(200, 206))):
        _dump(folder / name, {b"filenames": [b"f"] * len(ids), b"batch_label": name.encode(),
                              b"fine_labels": [int(i * 9 % 100) for i in ids],
                              b"coarse_labels": [int(i % 20) for i in ids], b"data": _rows(ids)})
    _dump(folder / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})


def _image(path: Path, color: tuple[int, int, int], size: int = 12, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), color)
    (image.convert(mode) if mode != "RGB" else image).save(path)


WNIDS = ["n03444034", "n01443537", "n02124075"]  # wnids.txt order is not sorted


def write_tiny(parent: Path, per_class: int = 4) -> Path:
    folder = parent / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (folder / "words.txt").write_text(
        "n00001740\tentity\nn01443537\tgoldfish, Carassius auratus\nn02124075\tEgyptian cat\nn03444034\tgo-kart\n"
    )
    order = sorted(WNIDS)
    for wnid in WNIDS:
        label = order.index(wnid)
        for k in range(per_class):
            _image(folder / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", (60 * label, 40 * k, 100), size=64)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for k in range(6):
        wnid = WNIDS[k % 3]
        _image(folder / "val" / "images" / f"val_{k}.JPEG", (60 * order.index(wnid), 200, 30 * k), size=64)
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t3\t60\t61")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    _image(folder / "test" / "images" / "test_0.JPEG", (1, 2, 3), size=64)  # unlabelled: never read
    return folder


PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
VLCS_DOMAINS = ("Caltech101", "LabelMe", "SUN09", "VOC2007")
VLCS_CLASSES = ("bird", "car", "chair", "dog", "person")


def write_domainbed(parent: Path, folder: str, domains, classes, per_class: int = 2) -> Path:
    """``parent/folder/<domain>/<class>/*``: colour (40 * domain, 30 * class, 20 * k); sketch as PNG."""
    root = parent / folder
    for d, domain in enumerate(domains):
        for c, name in enumerate(classes):
            for k in range(per_class):
                ext = "png" if domain == "sketch" else "jpg"
                _image(root / domain / name / f"pic_{k:03d}.{ext}", (40 * d, 30 * c, 20 * k))
    return root


def _pixels(splits: DataSplits, inputs: torch.Tensor) -> torch.Tensor:
    """Undo the per-channel standardization: float pixels in 0..255."""
    mean = torch.tensor(splits.mean, dtype=torch.float64).view(-1, 1, 1)
    std = torch.tensor(splits.std, dtype=torch.float64).view(-1, 1, 1)
    return (inputs.double() * std + mean) * 255


def _all(split) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of a split, through make_loader (as the training code reads it)."""
    batches = list(make_loader(split, batch_size=7))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _check_splits(splits: DataSplits, shape: tuple[int, int, int], num_classes: int) -> None:
    assert splits.input_shape == shape and splits.num_classes == num_classes
    assert len(splits.classes) == num_classes
    for split in (splits.train, splits.val, splits.test):
        assert isinstance(split, ImageTensorDataset)
        if len(split) == 0:
            continue
        x, y = next(iter(make_loader(split, 3)))
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == (min(3, len(split)), *shape) and y.shape == (len(x),)
        assert 0 <= int(y.min()) and int(y.max()) < num_classes
    # Standardization uses the train split only: per channel mean 0 and std 1 there.
    x, _ = _all(splits.train)
    assert torch.allclose(x.double().mean(dim=(0, 2, 3)), torch.zeros(shape[0], dtype=torch.float64), atol=1e-4)
    std = x.double().std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(std, torch.ones_like(std), atol=1e-4) or (std < 1e-6).any()


def _error(match: str, name: str, root, **kwargs) -> str:
    with pytest.raises(DatasetError, match=re.escape(match)) as info:
        load_dataset(name, root=None if root is None else str(root), **kwargs)
    return str(info.value)


# --------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style, point_at", [("python2", "parent"), ("numpy1", "folder"), ("numpy2", "parent")])
def test_cifar10(tmp_path: Path, style: str, point_at: str) -> None:
    arrays = write_cifar10(tmp_path, style=style)
    root = tmp_path if point_at == "parent" else tmp_path / "cifar-10-batches-py"
    splits = load_dataset("cifar10", root=str(root), val_fraction=0.25, seed=3)
    _check_splits(splits, (3, 32, 32), 10)
    assert splits.name == "cifar10" and splits.classes[0] == "airplane" and splits.classes[9] == "truck"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, N_CIFAR_TEST)
    assert isinstance(splits.mean, tuple) and len(splits.mean) == 3 and len(splits.std) == 3

    # Train and val partition the five batches in file order; every image keeps its pixels and label.
    seen = []
    for split in (splits.train, splits.val):
        x, y = _all(split)
        pixels = _pixels(splits, x).round().to(torch.uint8).numpy()
        ids = pixels[:, 0, 0, 0].astype(np.int64)
        np.testing.assert_array_equal(pixels.reshape(len(x), -1), arrays["train"][ids])
        np.testing.assert_array_equal(y.numpy(), arrays["train_labels"][ids])
        assert list(ids) == sorted(ids)
        seen.extend(ids.tolist())
    assert sorted(seen) == list(range(20))
    x, y = _all(splits.test)
    np.testing.assert_array_equal(_pixels(splits, x).round().to(torch.uint8).reshape(len(x), -1).numpy(),
                                  arrays["test"])
    np.testing.assert_array_equal(y.numpy(), arrays["test_labels"])

    # The statistics are the train split's own, per channel.
    train_pixels = torch.from_numpy(arrays["train"]).view(-1, 3, 1024)
    train_ids = _pixels(splits, _all(splits.train)[0]).round()[:, 0, 0, 0].long()
    expected = train_pixels[train_ids].double().mean(dim=(0, 2)) / 255
    assert np.allclose(splits.mean, expected.numpy(), atol=1e-9)


def test_cifar10_seed_limit_and_determinism(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    a = load_dataset("cifar10", root=str(tmp_path), val_fraction=0.5, seed=0)
    b = load_dataset("cifar10", root=str(tmp_path), val_fraction=0.5, seed=0)
    c = load_dataset("cifar10", root=str(tmp_path), val_fraction=0.5, seed=1)
    assert torch.equal(_all(a.val)[0], _all(b.val)[0]) and torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.val.images, c.val.images)
    limited = load_dataset("cifar10", root=str(tmp_path), val_fraction=0.5, seed=0, limit=3)
    assert (len(limited.train), len(limited.val), len(limited.test)) == (3, 3, 3)
    assert torch.equal(limited.val.images, a.val.images[:3])
    assert torch.equal(limited.test.labels, a.test.labels[:3])


def test_cifar100_fine_and_coarse(tmp_path: Path) -> None:
    write_cifar100(tmp_path)
    fine = load_dataset("cifar100", root=str(tmp_path), val_fraction=0.25)
    _check_splits(fine, (3, 32, 32), 100)
    assert (len(fine.train), len(fine.val), len(fine.test)) == (9, 3, 6)
    assert fine.classes[:2] == ("fine0", "fine1")
    assert fine.test.labels.tolist() == [i * 9 % 100 for i in range(200, 206)]
    coarse = load_dataset("cifar100", root=str(tmp_path / "cifar-100-python"), val_fraction=0.25, coarse_labels=True)
    _check_splits(coarse, (3, 32, 32), 20)
    assert coarse.classes[-1] == "coarse19"
    assert coarse.test.labels.tolist() == [i % 20 for i in range(200, 206)]
    assert torch.equal(coarse.train.images, fine.train.images)


class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_cifar_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({b"data": _Evil(f"touch {marker}"), b"labels": [0]}, protocol=2))
    message = _error("data_batch_3", "cifar10", tmp_path)
    assert "refusing to unpickle" in message and "system" in message
    assert not marker.exists()
    # The same with a payload hidden in a newer protocol and another dangerous global.
    batch.write_bytes(pickle.dumps([eval, "1"], protocol=4))
    assert "builtins.eval" in _error("data_batch_3", "cifar10", tmp_path)


@pytest.mark.parametrize(
    "damage, what",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-40]), "corrupt"),
        (lambda p: p.write_bytes(b"garbage, not a pickle"), "corrupt"),
        (lambda p: p.write_bytes(pickle.dumps([1, 2, 3], protocol=2)), "expected a pickled dict"),
        (lambda p: _dump(p, {b"data": np.zeros((2, 3072), np.uint8)}), "b'labels'"),
        (lambda p: _dump(p, {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), "(N, 3072)"),
        (lambda p: _dump(p, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "shape"),
        (lambda p: _dump(p, {b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}), "label 10"),
    ],
)
def test_cifar_corrupt_files_are_named(tmp_path: Path, damage, what: str) -> None:
    write_cifar10(tmp_path)
    damage(tmp_path / "cifar-10-batches-py" / "test_batch")
    assert what in _error("test_batch", "cifar10", tmp_path)


def test_cifar_missing_data_says_where_to_get_it(tmp_path: Path) -> None:
    url = "https://www.cs.toronto.edu/~kriz/cifar.html"
    message = _error("cifar-10-python.tar.gz", "cifar10", None)
    assert url in message and "root=" in message
    assert "does not exist" in _error(url, "cifar10", tmp_path / "nowhere")
    assert "cifar-10-batches-py" in _error("neither", "cifar10", tmp_path)  # empty folder
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    _error("cifar-10-python.tar.gz is not extracted: run tar xzf", "cifar10", tmp_path)
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    assert url in _error("lacks data_batch_4", "cifar10", tmp_path)
    assert "cifar-100-python.tar.gz" in _error("cifar-100-python", "cifar100", tmp_path)


# --------------------------------------------------------------------------------------------------
# Tiny-ImageNet-200
# --------------------------------------------------------------------------------------------------


def test_tiny_imagenet(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    splits = load_dataset("tiny_imagenet", root=str(tmp_path), val_fraction=0.25, seed=0)
    _check_splits(splits, (3, 64, 64), 3)
    # Labels follow the sorted wnids; names come from words.txt.
    assert splits.classes == ("goldfish, Carassius auratus", "Egyptian cat", "go-kart")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 6)
    # val/ is the test split, in annotation order; colours encode (label, k).
    order = sorted(WNIDS)
    assert splits.test.labels.tolist() == [order.index(WNIDS[k % 3]) for k in range(6)]
    x, y = _all(splits.test)
    colours = _pixels(splits, x).mean(dim=(2, 3))
    expected = torch.tensor([[60.0 * int(y[k]), 200.0, 30.0 * k] for k in range(6)], dtype=torch.float64)
    assert (colours - expected).abs().max() < 4  # JPEG
    x, y = _all(splits.train)
    assert ((_pixels(splits, x)[:, 0].mean(dim=(1, 2)) - 60.0 * y).abs() < 4).all()

    same_root = load_dataset("tiny_imagenet", root=str(tmp_path / "tiny-imagenet-200"), val_fraction=0.25, seed=0)
    assert torch.equal(same_root.train.images, splits.train.images)
    small = load_dataset("tiny_imagenet", root=str(tmp_path), image_size=16, limit=2)
    assert small.input_shape == (3, 16, 16) and (len(small.train), len(small.val), len(small.test)) == (2, 1, 2)


def test_tiny_imagenet_errors(tmp_path: Path) -> None:
    url = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
    assert "root=" in _error(url, "tiny_imagenet", None)
    assert url in _error("wnids.txt", "tiny_imagenet", tmp_path)
    folder = write_tiny(tmp_path)
    annotations = folder / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_9.JPEG\tn09999999\t0\t0\t1\t1\n")
    _error("n09999999 is not in wnids.txt", "tiny_imagenet", tmp_path)
    annotations.write_text("val_77.JPEG\tn01443537\t0\t0\t1\t1\n")
    _error("val_77.JPEG is listed", "tiny_imagenet", tmp_path)
    (folder / "val" / "images" / "val_77.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    _error("val_77.JPEG: cannot decode image", "tiny_imagenet", tmp_path)
    (folder / "train" / WNIDS[1] / "images").rename(folder / "train" / WNIDS[1] / "pictures")
    assert url in _error(f"{WNIDS[1]}/images is missing", "tiny_imagenet", tmp_path)


def test_pillow_missing_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tiny(tmp_path, per_class=1)
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    _error("pip install pillow", "tiny_imagenet", tmp_path)


# --------------------------------------------------------------------------------------------------
# PACS / VLCS (DomainBed layout)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pacs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    parent = tmp_path_factory.mktemp("domainbed")
    write_domainbed(parent, "PACS", PACS_DOMAINS, PACS_CLASSES)
    return parent


def _domain_of(splits: DataSplits, split) -> torch.Tensor:
    """Domain index of each sample, read back from the red channel (40 * domain)."""
    x, _ = _all(split)
    return (_pixels(splits, x)[:, 0].mean(dim=(1, 2)) / 40).round().long()


def test_pacs_random_80_10_10(pacs_root: Path) -> None:
    splits = load_dataset("pacs", root=str(pacs_root), image_size=8, seed=0)
    _check_splits(splits, (3, 8, 8), 7)
    assert splits.classes == PACS_CLASSES
    n = 4 * 7 * 2
    assert (len(splits.train), len(splits.val), len(splits.test)) == (n - 12, 6, 6)
    # The split mixes domains, and every sample keeps its class (green = 30 * class).
    domains = torch.cat([_domain_of(splits, s) for s in (splits.train, splits.val, splits.test)])
    assert sorted(domains.tolist()) == sorted([d for d in range(4) for _ in range(14)])
    x, y = _all(splits.train)
    assert ((_pixels(splits, x)[:, 1].mean(dim=(1, 2)) - 30.0 * y).abs() < 4).all()
    again = load_dataset("pacs", root=str(pacs_root / "PACS"), image_size=8, seed=0)
    assert torch.equal(again.test.images, splits.test.images)
    other = load_dataset("pacs", root=str(pacs_root), image_size=8, seed=1)
    assert not torch.equal(other.test.images, splits.test.images)


def test_pacs_leave_one_domain_out(pacs_root: Path) -> None:
    splits = load_dataset("pacs", root=str(pacs_root), image_size=8, test_domain="sketch", val_fraction=0.1)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (38, 4, 14)
    assert set(_domain_of(splits, splits.test).tolist()) == {3}
    assert 3 not in set(_domain_of(splits, splits.train).tolist()) | set(_domain_of(splits, splits.val).tolist())
    # sketch is PNG: exact colours; each class twice.
    assert sorted(splits.test.labels.tolist()) == sorted(list(range(7)) * 2)
    limited = load_dataset("pacs", root=str(pacs_root), image_size=8, test_domain="Sketch", limit=5)
    assert torch.equal(limited.test.images, splits.test.images[:5])
    with pytest.raises(ValueError, match="art_painting, cartoon, photo, sketch") as info:
        load_dataset("pacs", root=str(pacs_root), test_domain="clipart")
    assert not isinstance(info.value, DatasetError)


def test_vlcs_and_layout_errors(tmp_path: Path) -> None:
    root = write_domainbed(tmp_path, "VLCS", VLCS_DOMAINS, VLCS_CLASSES, per_class=1)
    splits = load_dataset("vlcs", root=str(tmp_path), image_size=6, test_domain="VOC2007", val_fraction=0.2)
    _check_splits(splits, (3, 6, 6), 5)
    assert splits.classes == VLCS_CLASSES and (len(splits.train), len(splits.val), len(splits.test)) == (12, 3, 5)

    (root / "LabelMe" / "car").rename(root / "LabelMe" / "cars")
    assert "DomainBed" in _error("['cars'] are not among the classes", "vlcs", tmp_path)
    (root / "LabelMe").rename(tmp_path / "elsewhere")
    assert "Caltech101, LabelMe, SUN09, VOC2007" in _error("lacks the domain folders LabelMe", "vlcs", tmp_path)
    assert "VLCS" in _error("does not exist", "vlcs", tmp_path / "nowhere")
    assert "PACS" in _error("no root given", "pacs", None)


# --------------------------------------------------------------------------------------------------
# image_folder
# --------------------------------------------------------------------------------------------------


def test_image_folder_flat(tmp_path: Path) -> None:
    for c, name in enumerate(("cat", "dog", "emu")):
        for k in range(5):
            # One grayscale PNG per class: converted to RGB.
            mode = "L" if k == 0 else "RGB"
            _image(tmp_path / name / f"{k}.png", (80 * c, 80 * c, 80 * c), mode=mode)
    (tmp_path / "emu" / "notes.txt").write_text("not an image")
    splits = load_dataset("image_folder", root=str(tmp_path), image_size=10, seed=2)
    _check_splits(splits, (3, 10, 10), 3)
    assert splits.classes == ("cat", "dog", "emu")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (11, 2, 2)
    for split in (splits.train, splits.val, splits.test):
        x, y = _all(split)
        assert (_pixels(splits, x) - 80.0 * y.view(-1, 1, 1, 1)).abs().max() < 1e-3  # PNG: exact


def test_image_folder_with_split_folders(tmp_path: Path) -> None:
    for split, count in (("train", 4), ("test", 1)):
        for c, name in enumerate(("a", "b", "c")):
            for k in range(count):
                _image(tmp_path / split / name / f"{k}.jpg", (80 * c, 10, 10))
    splits = load_dataset("image_folder", root=str(tmp_path), image_size=8, val_fraction=0.25)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 3)  # val held out of train/
    assert splits.test.labels.tolist() == [0, 1, 2]
    for c, name in enumerate(("a", "b")):
        _image(tmp_path / "val" / name / "v.jpg", (80 * c, 10, 10))
    splits = load_dataset("image_folder", root=str(tmp_path), image_size=8, val_fraction=0.25)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 2, 3)
    assert splits.val.labels.tolist() == [0, 1]

    _image(tmp_path / "val" / "zebra" / "z.jpg", (1, 1, 1))
    _error("['zebra'] are not among the classes", "image_folder", tmp_path)
    _error("image_folder reads a folder of your own", "image_folder", None)
    _error("has no class subfolders", "image_folder", tmp_path / "train" / "a")
    (tmp_path / "train").rename(tmp_path / "training")
    _error("no train/ folder", "image_folder", tmp_path)


# ==================================================================================================
# Augmentation and batched fetching
# ==================================================================================================


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _candidates(image: torch.Tensor, padding: int, flip: bool) -> list[torch.Tensor]:
    """Every image a padded random crop (and optional flip) can turn ``image`` (C, H, W) into."""
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    crops = [padded[:, dy : dy + h, dx : dx + w] for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)]
    return crops + [c.flip(-1) for c in crops] if flip else crops


def _is_augmentation_of(out: torch.Tensor, originals: torch.Tensor, padding: int, flip: bool) -> bool:
    return any(torch.equal(out, c) for image in originals for c in _candidates(image, padding, flip))


# --------------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------------


def test_random_crop_and_flip_are_crops_and_mirrors() -> None:
    images = torch.randint(1, 256, (16, 3, 5, 6), generator=_gen(1), dtype=torch.uint8)
    cropped = random_crop(images, 2, _gen())
    assert cropped.shape == images.shape and cropped.dtype == torch.uint8
    for original, out in zip(images, cropped):
        assert _is_augmentation_of(out, original[None], 2, flip=False)
    assert not torch.equal(cropped, images) and (cropped == 0).any()  # some shifts bring in zero padding
    flipped = random_flip(images, _gen())
    mirrored = [torch.equal(o, i.flip(-1)) for i, o in zip(images, flipped)]
    kept = [torch.equal(o, i) for i, o in zip(images, flipped)]
    assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)
    assert torch.equal(random_crop(images, 0, _gen()), images)


def test_random_resized_crop() -> None:
    x = torch.randn(4, 3, 7, 9, generator=_gen())
    same = random_resized_crop(x, (1.0, 1.0), _gen(), ratio=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)
    ramp = torch.arange(9.0).expand(4, 3, 7, 9).contiguous()
    out = random_resized_crop(ramp, (0.3, 0.6), _gen())
    assert out.shape == ramp.shape and not torch.allclose(out, ramp)
    # A crop inside the image of a left-to-right ramp is still a non-decreasing ramp within [0, 8].
    assert out.min() >= -1e-5 and out.max() <= 8 + 1e-5 and (out.diff(dim=-1) >= -1e-5).all()
    assert torch.equal(out, random_resized_crop(ramp, (0.3, 0.6), _gen()))


def test_augment_validation() -> None:
    with pytest.raises(ValueError, match="crop_padding"):
        Augment(crop_padding=-1)
    with pytest.raises(ValueError, match="resized_crop_scale"):
        Augment(resized_crop_scale=(0.0, 1.0))


# --------------------------------------------------------------------------------------------------
# Augmented CIFAR splits
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root)
    return root


def _epochs(split, epochs: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = make_loader(split, batch_size=6, shuffle=True, seed=0)
    return [batch for _ in range(epochs) for batch in loader]


def _raw(splits: DataSplits, x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(splits.mean, dtype=torch.float64).view(-1, 1, 1)
    std = torch.tensor(splits.std, dtype=torch.float64).view(-1, 1, 1)
    return ((x.double() * std + mean) * 255).round().to(torch.uint8)


def test_cifar_augmentation_reproducible_and_train_only(cifar_root: Path) -> None:
    plain = load_dataset("cifar10", root=str(cifar_root), val_fraction=0.25)
    a = load_dataset("cifar10", root=str(cifar_root), val_fraction=0.25, augment=True)
    b = load_dataset("cifar10", root=str(cifar_root), val_fraction=0.25, augment=True)
    c = load_dataset("cifar10", root=str(cifar_root), val_fraction=0.25, augment=True, seed=1)

    first, second = _epochs(a.train), _epochs(b.train)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, second))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, _epochs(plain.train)))
    c_first = make_loader(c.train, batch_size=6, shuffle=True, seed=0)
    assert not torch.equal(next(iter(c_first))[0], first[0][0])

    # Only the train split augments; the statistics are the same as without augmentation.
    assert a.train.augment == Augment(crop_padding=4, flip=True)
    assert a.val.augment is None and a.test.augment is None
    for name in ("val", "test"):
        assert torch.equal(make_loader(getattr(a, name), 64).__iter__().__next__()[0],
                           next(iter(make_loader(getattr(plain, name), 64)))[0])
    assert a.mean == plain.mean and a.std == plain.std

    # Every augmented image is a 4-pixel padded crop, maybe mirrored, of a train image of its class.
    x, y = first[0]
    originals = a.train.images
    for image, label in zip(_raw(a, x), y):
        assert _is_augmentation_of(image, originals[a.train.labels == label], 4, flip=True)


def test_custom_augment_and_reseed(cifar_root: Path) -> None:
    none = load_dataset("cifar10", root=str(cifar_root), augment=Augment(crop_padding=0, flip=False))
    plain = load_dataset("cifar10", root=str(cifar_root))
    assert torch.equal(next(iter(make_loader(none.train, 32)))[0], next(iter(make_loader(plain.train, 32)))[0])

    splits = load_dataset("cifar10", root=str(cifar_root), augment=True)
    once = next(iter(make_loader(splits.train, 8)))[0]
    assert not torch.equal(once, next(iter(make_loader(splits.train, 8)))[0])  # the stream moves on
    splits.train.reseed(0)
    assert torch.equal(once, next(iter(make_loader(splits.train, 8)))[0])  # ... and restarts
    splits.train.augment = None  # e.g. clean images for calibration
    assert torch.equal(next(iter(make_loader(splits.train, 8)))[0], next(iter(make_loader(plain.train, 8)))[0])


def test_folder_augmentation(tmp_path: Path) -> None:
    for c, name in enumerate(("x", "y")):
        for k in range(6):
            _image(tmp_path / name / f"{k}.png", (100 * c + 10 * k, 50, 200))
    a = load_dataset("image_folder", root=str(tmp_path), image_size=8, augment=True, val_fraction=0.2)
    b = load_dataset("image_folder", root=str(tmp_path), image_size=8, augment=True, val_fraction=0.2)
    assert a.train.augment is not None and a.train.augment.resized_crop_scale == (0.7, 1.0)
    xa, xb = _epochs(a.train), _epochs(b.train)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(xa, xb))
    assert xa[0][0].shape[1:] == (3, 8, 8) and xa[0][0].dtype == torch.float32
    assert a.test.augment is None


# --------------------------------------------------------------------------------------------------
# Batched fetching
# --------------------------------------------------------------------------------------------------


def test_batches_are_fetched_whole(cifar_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    splits = load_dataset("cifar10", root=str(cifar_root))
    reference = splits.train.tensors
    calls = []
    fetch = ImageTensorDataset.fetch
    monkeypatch.setattr(ImageTensorDataset, "fetch", lambda self, idx, augment=True: (calls.append(len(idx)),
                                                                                     fetch(self, idx, augment))[1])
    monkeypatch.setattr(ImageTensorDataset, "__getitem__", lambda self, i: pytest.fail("per-sample fetch"))
    batches = list(make_loader(splits.train, batch_size=8))
    assert calls == [8, 8, 2]  # one fetch per batch of 8 (18 train images)
    assert torch.equal(torch.cat([x for x, _ in batches]), reference[0])
    assert torch.equal(torch.cat([y for _, y in batches]), reference[1])


def test_default_collate_and_single_items_still_work(cifar_root: Path) -> None:
    splits = load_dataset("cifar10", root=str(cifar_root))
    x, y = next(iter(DataLoader(splits.test, batch_size=4)))  # torch's own collate
    ref_x, ref_y = next(iter(make_loader(splits.test, 4)))
    assert torch.equal(x, ref_x) and torch.equal(y, ref_y)
    item_x, item_y = splits.test[2]
    assert torch.equal(item_x, ref_x[2]) and int(item_y) == int(ref_y[2])
    batch = splits.test.__getitems__([0, 1])
    assert isinstance(batch, Batch) and len(batch) == 2 and torch.equal(batch[1][0], ref_x[1])
    assert collate(batch)[0] is batch.inputs
    assert splits.test.tensors[0].shape == (5, 3, 32, 32)
