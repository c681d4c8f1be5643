"""Hostile save folders are refused before anything is read or allocated (issue 14): links out of
the folder, FIFOs, directories, /dev/zero, compressed archive entries, malformed JSON of every kind;
and what save writes next to those checks loads (tied weights, views, outputs, float64)."""

from __future__ import annotations

import io
import json
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


# -- what save writes, load accepts (the other side of the checks) ----------------------------------

def _trace_and_save(module: nn.Module, directory):
    gm = torch.fx.symbolic_trace(module.eval())
    nepenthe.save(gm, directory)
    return gm


def test_tuple_and_dict_outputs_load(tmp_path):
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.a(x), {"b": self.b(x), "none": None}

    gm = _trace_and_save(TwoHeads(), tmp_path / "m")
    x = torch.randn(5, 4)
    (a, d), (a2, d2) = gm(x), nepenthe.load(tmp_path / "m")(x)
    assert torch.equal(a, a2) and torch.equal(d["b"], d2["b"]) and d2["none"] is None


def test_tied_weights_stay_one_tensor_and_views_are_saved_compact(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight  # tied: two names, one tensor
            self.c = nn.Linear(4, 2)
            self.c.weight = nn.Parameter(torch.randn(6, 4)[4:])  # a view into a larger storage

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    gm = _trace_and_save(Tied(), tmp_path / "m")
    loaded = nepenthe.load(tmp_path / "m")
    state = torch.load(tmp_path / "m" / "weights.pt", weights_only=True)
    assert state["c.weight"].untyped_storage().nbytes() == 2 * 4 * 4  # not the 6 x 4 it viewed
    assert state["a.weight"].untyped_storage().data_ptr() == state["b.weight"].untyped_storage().data_ptr()
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x), gm(x))


def test_different_views_of_one_storage_are_refused(tmp_path):
    from nepenthe.fold.archive import _scan_archive

    w = torch.randn(4, 4)
    torch.save({"a": w, "b": w.t()}, tmp_path / "w.pt")  # both cover the storage, but differently
    with pytest.raises(RecipeError, match="share storage .* different views"):
        _scan_archive(tmp_path / "w.pt", 32)


def test_save_refuses_a_graph_that_writes_into_its_weights(tmp_path):
    class Drifting(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3), requires_grad=False)

        def forward(self, x):
            self.w.mul_(2)  # changes the model on every call
            return x * self.w

    with pytest.raises(RecipeError, match="writes into the stored tensor 'w'"):
        _trace_and_save(Drifting(), tmp_path / "m")


def test_inplace_ops_on_activations_are_fine(tmp_path):
    class Inplace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(3, 3), nn.ReLU(inplace=True)

        def forward(self, x):
            y = self.act(self.fc(x))
            y += x
            return y.mul_(2)

    gm = _trace_and_save(Inplace(), tmp_path / "m")
    x = torch.randn(2, 3)
    assert torch.equal(nepenthe.load(tmp_path / "m")(x), gm(x))


def test_a_registered_class_cannot_carry_device_or_dtype(tmp_path):
    from nepenthe.fold import register_module
    from nepenthe.fold.registry import _MODULES

    class Scaled(nn.Linear):
        pass

    class Leaves(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, Scaled) or super().is_leaf_module(m, name)

    register_module(Scaled, lambda m: dict(in_features=m.in_features, out_features=m.out_features, device="cpu"))
    model = nn.Sequential(Scaled(2, 2))
    try:
        with pytest.raises(RecipeError, match=r"\['device'\].*meta device"):
            nepenthe.save(torch.fx.GraphModule(model, Leaves().trace(model)), tmp_path / "m")
    finally:
        del _MODULES["Scaled"]


def test_float64_is_loaded_where_declared_and_older_recipes_need_one_dtype(saved, tmp_path):
    model = nn.Sequential(nn.Linear(3, 2)).double()
    _trace_and_save(model, tmp_path / "d")
    assert getattr(nepenthe.load(tmp_path / "d"), "0").weight.dtype == torch.float64
    recipe = json.loads((saved / "recipe.json").read_text())
    del recipe["dtypes"]
    recipe["format"] = "nepenthe.folded/2"  # written before tensors' dtypes were recorded
    (saved / "recipe.json").write_text(json.dumps(recipe))
    nepenthe.load(saved)
    state = torch.load(saved / "weights.pt", weights_only=True)
    torch.save({**state, "0.bias": state["0.bias"].double()}, saved / "weights.pt")
    with pytest.raises(RecipeError, match="mixes"):
        nepenthe.load(saved)


def test_map_location_meta_reads_shapes_only_and_a_bad_device_is_named(saved):
    loaded = nepenthe.load(saved, map_location="meta")
    assert all(t.is_meta for t in loaded.state_dict().values())
    with pytest.raises(ValueError, match="map_location='gpu0' is not a device"):
        nepenthe.load(saved, map_location="gpu0")
