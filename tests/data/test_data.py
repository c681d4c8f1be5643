"""Tests for nepenthe.data: dataset loading, IDX parsing/validation and data loaders."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from nepenthe.data import (
    FASHION_MNIST_DIR,
    DatasetError,
    DataSplits,
    available_datasets,
    load_dataset,
    make_loader,
    read_idx,
    write_idx,
)

N_TRAIN_FILE = 20  # images in the synthetic "train" IDX file
N_TEST_FILE = 6  # images in the synthetic "t10k" IDX file


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _synthetic_images(n: int, offset: int) -> np.ndarray:
    """n distinct 28x28 uint8 images; image i's first pixel is 7 * i + offset, so it identifies i."""
    base = np.arange(28 * 28, dtype=np.int64).reshape(28, 28)
    return np.stack([(7 * i + offset + base) % 256 for i in range(n)]).astype(np.uint8)


def _write_fashion(folder: Path, gz: bool = True) -> dict[str, np.ndarray]:
    """Write a tiny Fashion-MNIST-shaped dataset into ``folder`` and return the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": _synthetic_images(N_TRAIN_FILE, offset=0),
        "train-labels-idx1-ubyte": (np.arange(N_TRAIN_FILE) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": _synthetic_images(N_TEST_FILE, offset=3),
        "t10k-labels-idx1-ubyte": (np.arange(N_TEST_FILE)[::-1] % 10).astype(np.uint8),
    }
    suffix = ".gz" if gz else ""
    for stem, array in arrays.items():
        write_idx(folder / f"{stem}{suffix}", array)
    return arrays


def _raw_pixels(splits: DataSplits, inputs: torch.Tensor) -> np.ndarray:
    """Undo standardization and [0, 1] scaling to recover uint8 pixels of shape (N, 28, 28)."""
    pixels = (inputs.double() * splits.std + splits.mean) * 255.0
    return np.rint(pixels.squeeze(1).numpy()).astype(np.uint8)


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_dataset("digits")


# --------------------------------------------------------------------------------------------------
# Registry and arguments
# --------------------------------------------------------------------------------------------------


def test_available_datasets() -> None:
    assert set(available_datasets()) == {
        "digits", "fashion_mnist", "cifar10", "cifar100", "tiny_imagenet", "pacs", "vlcs", "image_folder"
    }


def test_unknown_dataset_lists_available_names() -> None:
    with pytest.raises(ValueError, match="digits.*fashion_mnist.*cifar10.*image_folder") as info:
        load_dataset("imagenet")
    assert not isinstance(info.value, DatasetError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"val_fraction": 1.0},
        {"val_fraction": -0.1},
        {"limit": 0},
        {"image_size": 0},
        # options of the image datasets that digits does not take
        {"augment": True},
        {"image_size": 32},
        {"test_domain": "photo"},
        {"coarse_labels": True},
    ],
)
def test_invalid_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        load_dataset("digits", **kwargs)


# --------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------


def test_digits_shapes_sizes_dtypes(digits: DataSplits) -> None:
    assert digits.name == "digits"
    assert digits.num_classes == 10
    assert digits.input_shape == (1, 8, 8)
    sizes = (len(digits.train), len(digits.val), len(digits.test))
    assert sum(sizes) == 1797
    assert sizes == (1293, 144, 360)  # 20 % test, then 10 % of the remaining 1437 as val
    for split in (digits.train, digits.val, digits.test):
        x, y = split.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8) and len(x) == len(y)
        assert 0 <= int(y.min()) and int(y.max()) <= 9
    assert digits.summary() == {
        "name": "digits",
        "train": 1293,
        "val": 144,
        "test": 360,
        "num_classes": 10,
        "input_shape": (1, 8, 8),
        "mean": digits.mean,
        "std": digits.std,
    }


def test_digits_is_deterministic_per_seed(digits: DataSplits) -> None:
    again = load_dataset("digits", seed=0)
    other = load_dataset("digits", seed=1)
    for a, b in zip((digits.train, digits.val, digits.test), (again.train, again.val, again.test)):
        assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(digits.test.tensors[0], other.test.tensors[0])


def test_digits_stratified(digits: DataSplits) -> None:
    for split in (digits.train, digits.val, digits.test):
        counts = torch.bincount(split.tensors[1], minlength=10)
        assert (counts > 0).all()
        # Stratification keeps each class's share within a couple of samples of the overall share.
        shares = counts.double() / counts.sum()
        assert (shares - 0.1).abs().max() < 0.02


def test_digits_standardized_with_train_stats(digits: DataSplits) -> None:
    x = digits.train.tensors[0].double()
    assert abs(float(x.mean())) < 1e-5
    assert abs(float(x.std(unbiased=False)) - 1.0) < 1e-5
    # Undoing the normalisation gives the original integer intensities 0..16.
    for split in (digits.train, digits.val, digits.test):
        pixels = (split.tensors[0].double() * digits.std + digits.mean) * 16.0
        assert torch.allclose(pixels, pixels.round(), atol=1e-4)
        assert float(pixels.min()) > -1e-4 and float(pixels.max()) < 16 + 1e-4


def test_digits_limit_and_no_val() -> None:
    small = load_dataset("digits", limit=7)
    assert small.summary()["train"] == small.summary()["val"] == small.summary()["test"] == 7
    no_val = load_dataset("digits", val_fraction=0.0)
    assert (len(no_val.train), len(no_val.val), len(no_val.test)) == (1437, 0, 360)
    assert no_val.val.tensors[0].shape == (0, 1, 8, 8)


# --------------------------------------------------------------------------------------------------
# IDX format
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_write_read_idx_roundtrip(tmp_path: Path, name: str) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / name, array)
    raw = (gzip.open if name.endswith(".gz") else open)(tmp_path / name, "rb").read()
    assert raw[:4] == b"\x00\x00\x08\x03" and raw[4:16] == bytes([0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4])
    np.testing.assert_array_equal(read_idx(tmp_path / name, expected_magic=2051), array)


def test_write_idx_rejects_non_uint8(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "x.idx", np.zeros(3, dtype=np.int64))


# --------------------------------------------------------------------------------------------------
# fashion_mnist from synthetic IDX files
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_idx_files(tmp_path: Path, gz: bool) -> None:
    arrays = _write_fashion(tmp_path, gz=gz)
    splits = load_dataset("fashion_mnist", root=str(tmp_path), val_fraction=0.25, seed=3)
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, N_TEST_FILE)

    # Train and val partition the train file; each sample keeps its exact pixels and label.
    src_images, src_labels = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    seen = []
    for split in (splits.train, splits.val):
        x, y = split.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        pixels = _raw_pixels(splits, x)
        index = pixels[:, 0, 0].astype(np.int64) // 7
        np.testing.assert_array_equal(pixels, src_images[index])
        np.testing.assert_array_equal(y.numpy(), src_labels[index])
        assert list(index) == sorted(index)  # splits keep file order
        seen.extend(index.tolist())
    assert sorted(seen) == list(range(N_TRAIN_FILE))

    # The test split is t10k, unchanged and in order.
    np.testing.assert_array_equal(
        _raw_pixels(splits, splits.test.tensors[0]), arrays["t10k-images-idx3-ubyte"]
    )
    np.testing.assert_array_equal(splits.test.tensors[1].numpy(), arrays["t10k-labels-idx1-ubyte"])

    # Standardization uses the train split only.
    train_x = splits.train.tensors[0].double()
    assert abs(float(train_x.mean())) < 1e-5 and abs(float(train_x.std(unbiased=False)) - 1) < 1e-5


def test_fashion_mnist_seed_and_limit(tmp_path: Path) -> None:
    _write_fashion(tmp_path)
    a = load_dataset("fashion_mnist", root=str(tmp_path), seed=0, val_fraction=0.5)
    b = load_dataset("fashion_mnist", root=str(tmp_path), seed=0, val_fraction=0.5)
    c = load_dataset("fashion_mnist", root=str(tmp_path), seed=1, val_fraction=0.5)
    assert torch.equal(a.val.tensors[1], b.val.tensors[1]) and torch.equal(a.val.tensors[0], b.val.tensors[0])
    assert not np.array_equal(_raw_pixels(a, a.val.tensors[0]), _raw_pixels(c, c.val.tensors[0]))

    limited = load_dataset("fashion_mnist", root=str(tmp_path), seed=0, val_fraction=0.5, limit=3)
    assert (len(limited.train), len(limited.val), len(limited.test)) == (3, 3, 3)
    np.testing.assert_array_equal(
        _raw_pixels(limited, limited.val.tensors[0]), _raw_pixels(a, a.val.tensors[0][:3])
    )


def test_fashion_mnist_prefers_gz_then_plain(tmp_path: Path) -> None:
    # Mixed folder: labels only as plain files, images only gzipped.
    arrays = _write_fashion(tmp_path, gz=True)
    for stem in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / f"{stem}.gz").unlink()
        write_idx(tmp_path / stem, arrays[stem])
    # A broken plain copy next to a good .gz is never opened: X.gz wins over X.
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"garbage")
    splits = load_dataset("fashion_mnist", root=str(tmp_path), val_fraction=0.0)
    assert len(splits.train) == N_TRAIN_FILE
    np.testing.assert_array_equal(splits.train.tensors[1].numpy(), arrays["train-labels-idx1-ubyte"])


# --------------------------------------------------------------------------------------------------
# fashion_mnist: malformed or missing files
# --------------------------------------------------------------------------------------------------


def _expect_error(root: Path, file_name: str, what: str) -> None:
    with pytest.raises(DatasetError, match=re.escape(file_name)) as info:
        load_dataset("fashion_mnist", root=str(root))
    assert what in str(info.value)


def test_bad_magic(tmp_path: Path) -> None:
    _write_fashion(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    data[3] = 0x01  # 2049: a label-file magic where an image file is expected
    path.write_bytes(bytes(data))
    _expect_error(tmp_path, "train-images-idx3-ubyte", "magic")


def test_truncated_file(tmp_path: Path) -> None:
    _write_fashion(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-10]))
    _expect_error(tmp_path, "t10k-images-idx3-ubyte.gz", "truncated")


def test_trailing_bytes(tmp_path: Path) -> None:
    _write_fashion(tmp_path, gz=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\x00")
    _expect_error(tmp_path, "train-labels-idx1-ubyte", "trailing")


def test_truncated_header(tmp_path: Path) -> None:
    _write_fashion(tmp_path, gz=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08")
    _expect_error(tmp_path, "train-images-idx3-ubyte", "too short")


def test_corrupt_gzip(tmp_path: Path) -> None:
    _write_fashion(tmp_path, gz=True)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    _expect_error(tmp_path, "train-labels-idx1-ubyte.gz", "cannot read")


def test_mismatched_counts(tmp_path: Path) -> None:
    arrays = _write_fashion(tmp_path, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", arrays["train-labels-idx1-ubyte"][:-1])
    _expect_error(tmp_path, "train-labels-idx1-ubyte.gz", f"{N_TRAIN_FILE} images")


def test_wrong_image_size(tmp_path: Path) -> None:
    _write_fashion(tmp_path, gz=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((N_TEST_FILE, 8, 8), dtype=np.uint8))
    _expect_error(tmp_path, "t10k-images-idx3-ubyte.gz", "(28, 28)")


def test_label_out_of_range(tmp_path: Path) -> None:
    _write_fashion(tmp_path, gz=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(N_TEST_FILE, 10, dtype=np.uint8))
    _expect_error(tmp_path, "t10k-labels-idx1-ubyte.gz", "label 10")


def test_missing_folder(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nowhere", "nowhere", "apt-get install dataset-fashion-mnist")


def test_missing_file(tmp_path: Path) -> None:
    _write_fashion(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    _expect_error(tmp_path, "t10k-labels-idx1-ubyte", "root=")


# --------------------------------------------------------------------------------------------------
# Real Fashion-MNIST (Debian package dataset-fashion-mnist)
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist() -> None:
    splits = load_dataset("fashion_mnist", val_fraction=0.1)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54000, 6000, 10000)
    assert splits.num_classes == 10 and splits.input_shape == (1, 28, 28)
    for split in (splits.train, splits.val, splits.test):
        assert torch.equal(torch.unique(split.tensors[1]), torch.arange(10))
        assert split.tensors[0].shape[1:] == (1, 28, 28)
    assert torch.bincount(splits.test.tensors[1]).tolist() == [1000] * 10  # t10k is balanced
    x = splits.train.tensors[0]
    assert abs(float(x.mean(dtype=torch.float64))) < 1e-4
    assert 0 < splits.mean < 1 and 0 < splits.std < 1


# --------------------------------------------------------------------------------------------------
# make_loader
# --------------------------------------------------------------------------------------------------


def _batch_labels(loader: torch.utils.data.DataLoader) -> list[int]:
    return [int(v) for _, y in loader for v in y]


def test_make_loader(digits: DataSplits) -> None:
    ordered = make_loader(digits.val, batch_size=32)
    assert _batch_labels(ordered) == digits.val.tensors[1].tolist()  # no shuffle: dataset order
    x, y = next(iter(ordered))
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,)
    assert len(make_loader(digits.val, batch_size=32, drop_last=True)) == len(digits.val) // 32
    assert len(ordered) == -(-len(digits.val) // 32)

    first = _batch_labels(make_loader(digits.train, batch_size=64, shuffle=True, seed=5))
    second = _batch_labels(make_loader(digits.train, batch_size=64, shuffle=True, seed=5))
    other = _batch_labels(make_loader(digits.train, batch_size=64, shuffle=True, seed=6))
    assert first == second != other
    assert sorted(first) == sorted(digits.train.tensors[1].tolist())
