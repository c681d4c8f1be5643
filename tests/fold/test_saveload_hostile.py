"""Hostile save folders are refused before anything is read or allocated (issue 14): links out of
the folder, FIFOs, directories, /dev/zero, compressed archive entries, malformed JSON of every kind."""

from __future__ import annotations

import io
import os
import zipfile

import pytest
import torch
import torch.nn as nn

import nepenthe
from nepenthe.errors import RecipeError


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(16, 6)
    folded = nepenthe.fold(model, nepenthe.measure(model, [x]), x)
    out = tmp_path / "saved"
    nepenthe.save(folded, out)
    return out


def test_a_clean_folder_loads(saved):
    nepenthe.load(saved)


@pytest.mark.parametrize("name", ["recipe.json", "weights.pt"])
def test_links_out_of_the_folder_and_special_files_are_refused(saved, tmp_path, name):
    target = saved / name
    outside = tmp_path / "elsewhere"
    outside.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(RecipeError, match="points outside"):
        nepenthe.load(saved)
    target.unlink()
    target.symlink_to("/dev/zero")
    with pytest.raises(RecipeError, match="points outside"):
        nepenthe.load(saved)
    target.unlink()
    os.mkfifo(target)  # would block a plain open() forever
    with pytest.raises(RecipeError, match="a FIFO"):
        nepenthe.load(saved)
    target.unlink()
    target.mkdir()
    with pytest.raises(RecipeError, match="a directory"):
        nepenthe.load(saved)


def test_compressed_archive_entries_are_refused(saved):
    weights = saved / "weights.pt"
    buf = io.BytesIO()
    with zipfile.ZipFile(weights) as src, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    weights.write_bytes(buf.getvalue())
    with pytest.raises(RecipeError, match="compressed entries"):
        nepenthe.load(saved)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"format": ' + "9" * 5000 + "}", "{not json",
                                  b"\xff\xfe".decode("latin-1")])
def test_malformed_json_is_a_recipe_error(saved, text):
    (saved / "recipe.json").write_text(text, encoding="latin-1")
    with pytest.raises(RecipeError):
        nepenthe.load(saved)
