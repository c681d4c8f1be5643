"""Saving, loading and exporting folded models (nepenthe.fold.recipe, nepenthe.fold.export).

Folded models are built without training: ``forced_stats`` declares chosen rectifiers always-ON
(or per-neuron states) so that ``fold`` removes them, and ``planner="all"`` makes every exact merge
(no timing). ``verify=False``: the forced states are not the model's real ones on random inputs;
what is checked here is that a saved model comes back computing exactly the same function.
"""

from __future__ import annotations

import json
import pickle
import sys

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import nepenthe
from nepenthe import RecipeError, load, save
from nepenthe.fold import ChannelAffine, export_onnx, register_module
from nepenthe.fold.modules import StateRectifier
from nepenthe.fold.preview import NeuronState, empty_layers, forced_stats, linearized
from nepenthe.fold.recipe import FORMAT, FROM_ORIGINAL
from nepenthe.fold.registry import _MODULES
from nepenthe.masks import get_mask, set_mask

OFF, ON, SAT = NeuronState.OFF, NeuronState.ON, NeuronState.SAT

FP32_TOL = 1e-5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def fold(model: nn.Module, x: torch.Tensor, states: dict) -> fx.GraphModule:
    model.eval()
    gm = nepenthe.fold(model, forced_stats(model, x, states), x, planner="all", verify=False)
    assert isinstance(gm, fx.GraphModule)
    return gm


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape
    return float((out - ref).abs().max() / ref.abs().max())


def same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a(x), b(x))


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


class ResBlockCNN(nn.Module):
    """Conv-BN-ReLU stem and a residual block (1×1 conv, ReLU, 3×3 conv, + skip), pooled head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv3, self.bn3, self.relu3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 5)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2, self.bn3):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        y = self.relu1(self.bn1(self.conv1(x)))
        z = self.bn3(self.conv3(self.relu2(self.bn2(self.conv2(y)))))
        return self.fc(torch.flatten(self.pool(self.relu3(y + z)), 1))


class MLPBlock(nn.Module):
    """A transformer MLP block: x + fc2(act(fc1(LN(x)))), then a head."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.ReLU(), \
            nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = x + self.fc2(self.act(self.fc1(self.norm(x))))
        return self.head(x.mean(1))


class MyNorm(nn.LayerNorm):
    """A LayerNorm subclass: fx inlines it, so the graph reads its weight and bias by get_attr."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps) * 1.0


class WindowAttention(nn.Module):
    """Swin-like: shifted tokens, multi-head attention with a relative-position-bias table indexed
    by a non-persistent buffer, then an MLP whose ReLU gets folded."""

    def __init__(self, dim: int = 8, heads: int = 2, window: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = MyNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn(2 * window - 1, heads) * 0.1)
        index = torch.arange(window)[:, None] - torch.arange(window)[None, :] + window - 1
        self.register_buffer("index", index, persistent=False)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        h = torch.roll(self.norm(x), shifts=1, dims=1)
        q, k, v = self.qkv(h).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5
        bias = self.table[self.index.view(-1)].view(N, N, -1).permute(2, 0, 1)
        attn = torch.softmax(attn + bias.unsqueeze(0), dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(B, N, C)
        a, b = out.chunk(2, dim=-1)
        out = torch.roll(self.proj(torch.cat([b, a], dim=-1)), shifts=-1, dims=1)
        x = x + out
        y = F.pad(x, (0, 0, 1, 1))[:, 1:-1, ...]
        y = self.fc2(self.act(self.fc1(y)))
        return torch.stack([x, y * torch.tensor(0.5)]).sum(0)


class MHANet(nn.Module):
    """nn.MultiheadAttention is a leaf for torch.fx and not in the recipe registry."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.fc1, self.act = nn.Linear(dim, dim), nn.ReLU()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.fc2 = nn.Linear(dim, 4)

    def forward(self, x):
        h = self.act(self.fc1(x))
        a = self.attn(h, h, h, need_weights=False)[0]
        return self.fc2(a + h)


class TalkingHeads(nn.Module):
    """A custom block kept as a leaf by a custom tracer, with a parameter and a non-persistent buffer."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.mix = nn.Parameter(torch.eye(dim) + 0.1 * torch.randn(dim, dim))
        self.register_buffer("phase", torch.linspace(0, 1, dim), persistent=False)

    def forward(self, x):
        return torch.softmax(x @ self.mix, dim=-1) * x + self.phase


class OtherHeads(TalkingHeads):
    pass


class LeafNet(nn.Module):
    def __init__(self, heads_cls=TalkingHeads):
        super().__init__()
        self.fc1, self.act, self.heads, self.fc2 = nn.Linear(6, 8), nn.ReLU(), heads_cls(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.heads(self.act(self.fc1(x))))


class LeafTracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, TalkingHeads) or super().is_leaf_module(m, qualname)


def leaf_graph(model: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(model, LeafTracer().trace(model), type(model).__name__)


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folded_cnn():
    torch.manual_seed(1)
    model = ResBlockCNN()
    x = torch.randn(4, 3, 8, 8)
    gm = fold(model, x, {"relu2": "on"})
    assert gm.fold_report.batchnorms_fused == 3 and "relu2" in gm.fold_report.removed
    return gm, torch.randn(5, 3, 8, 8)


@pytest.fixture(scope="module")
def folded_mlp_block():
    torch.manual_seed(2)
    model = MLPBlock()
    x = torch.randn(4, 5, 8)
    gm = fold(model, x, {"act": "on"})
    assert gm.fold_report.ops_merged >= 1
    return gm, torch.randn(3, 5, 8)


@pytest.fixture(scope="module")
def folded_attention():
    torch.manual_seed(3)
    model = WindowAttention()
    x = torch.randn(4, 4, 8)
    gm = fold(model, x, {"act": "on"})
    assert "act" in gm.fold_report.removed and gm.fold_report.ops_merged >= 1
    return gm, torch.randn(3, 4, 8)


@pytest.fixture(scope="module")
def folded_mha():
    torch.manual_seed(4)
    model = MHANet()
    x = torch.randn(2, 5, 8)
    gm = fold(model, x, {"act": "on"})
    return model, gm, torch.randn(3, 5, 8)


@pytest.fixture(scope="module")
def folded_leaf():
    torch.manual_seed(5)
    model = LeafNet().eval()
    x = torch.randn(4, 6)
    gm = fold(leaf_graph(model), x, {"act": "on"})
    assert isinstance(gm.heads, TalkingHeads)
    return model, gm, torch.randn(7, 6)


# --------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------


def test_save_load_roundtrip_recipe_only(tmp_path, folded_cnn):
    gm, x = folded_cnn
    save(gm, tmp_path / "folded")
    assert {p.name for p in (tmp_path / "folded").iterdir()} == {"recipe.json", "weights.pt"}
    loaded = load(tmp_path / "folded")
    assert same(loaded, gm, x)
    assert not loaded.training
    assert type(loaded).__name__ == "ResBlockCNN"
    weights = torch.load(tmp_path / "folded" / "weights.pt", weights_only=True)
    assert weights.keys() == gm.state_dict().keys() == loaded.state_dict().keys()
    recipe = json.loads((tmp_path / "folded" / "recipe.json").read_text())
    assert recipe["format"] == FORMAT
    assert recipe["fold_report"]["batchnorms_fused"] == gm.fold_report.batchnorms_fused
    assert recipe["source"] == {"model": "ResBlockCNN", "nepenthe": nepenthe.__version__,
                                "torch": torch.__version__}
    assert all(spec["class"] != FROM_ORIGINAL for spec in recipe["modules"].values())


def test_save_load_transformer_mlp_block(tmp_path, folded_mlp_block):
    gm, x = folded_mlp_block
    save(gm, tmp_path / "b", extra={"note": "mlp"})
    loaded = load(tmp_path / "b")
    assert same(loaded, gm, x)
    assert json.loads((tmp_path / "b" / "recipe.json").read_text())["extra"] == {"note": "mlp"}


def test_save_load_attention_graph_with_get_attr_and_common_functions(tmp_path, folded_attention):
    """layer_norm / softmax / matmul / roll / pad / chunk / cat / stack / getattr(shape) and
    get_attr of parameters and of tensor constants (buffers of the traced graph)."""
    gm, x = folded_attention
    save(gm, tmp_path / "a")
    recipe = json.loads((tmp_path / "a" / "recipe.json").read_text())
    reads = {n["target"] for n in recipe["nodes"] if n["op"] == "get_attr"}
    assert {"norm.weight", "norm.bias", "table"} <= reads
    assert any(t.startswith("_tensor_constant") for t in reads)  # the index (folded into a constant) and the 0.5
    assert recipe["attributes"]["table"] == {"kind": "parameter", "shape": [7, 2], "dtype": "float32",
                                             "requires_grad": True}
    assert any(a["dtype"] == "int64" and a["kind"] == "buffer" for a in recipe["attributes"].values())
    called = {n["target"] for n in recipe["nodes"] if n["op"] in ("call_function", "call_method")}
    assert {"F.layer_norm", "torch.roll", "torch.softmax", "torch.matmul", "F.pad", "torch.cat", "torch.stack",
            "builtins.getattr", "operator.matmul", "chunk", "unbind"} <= called
    loaded = load(tmp_path / "a")
    assert same(loaded, gm, x)
    assert loaded.state_dict().keys() == gm.state_dict().keys()
    assert isinstance(loaded.table, nn.Parameter) and loaded.table.requires_grad


def test_channel_affine_roundtrip(tmp_path):
    """A rectifier whose producer has other users becomes a ChannelAffine module; it round-trips."""

    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(6, 8), nn.ReLU6(), nn.Linear(8, 8)

        def forward(self, x):
            z = self.fc1(x)
            return self.fc2(self.act(z)) + z  # z is used twice: the affine map cannot go into fc1

    x = torch.randn(16, 6)
    gm = fold(TwoUsers(), x, {"act": torch.tensor([SAT, ON, OFF, ON] * 2)})
    assert any(isinstance(m, ChannelAffine) for m in gm.modules())
    save(gm, tmp_path / "f")
    assert same(load(tmp_path / "f"), gm, x)


class EmptiedConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.r1, self.conv2, self.r2 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), \
            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.conv3 = nn.Conv2d(4, 2, 3)

    def forward(self, x):
        return self.conv3(self.r2(self.conv2(self.r1(self.conv1(x))))) + self.conv1(x)[:, :2, 1:-1, 1:-1]


def test_modules_made_by_folding_roundtrip(tmp_path):
    """ConstantChannels (an emptied layer's output) and StateRectifier (preview.linearized)."""
    model = empty_layers(EmptiedConvNet().eval(), ["conv2"])
    x = torch.randn(2, 3, 8, 8)
    gm = nepenthe.fold(model, forced_stats(model, x, {"r1": "on"}, default="measured"), x, planner="all",
                       verify=False)
    assert any(type(m).__name__ == "ConstantChannels" for m in gm.modules())
    save(gm, tmp_path / "c")
    assert same(load(tmp_path / "c"), gm, x)

    lin = linearized(model, forced_stats(model, x, {"r1": torch.tensor([ON, OFF, 3, ON])}))
    assert any(isinstance(m, StateRectifier) for m in lin.modules())
    save(lin, tmp_path / "s")
    loaded = load(tmp_path / "s")
    assert any(isinstance(m, StateRectifier) for m in loaded.modules())
    assert same(loaded, lin, x)


def test_float64_model_keeps_its_dtype(tmp_path):
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    gm = fold(ResBlockCNN().double(), x, {"relu2": "on"})
    save(gm, tmp_path / "d")
    loaded = load(tmp_path / "d")
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    assert same(loaded, gm, x)


def test_plain_module_is_traced_before_saving(tmp_path):
    """fold may return a copy of the model itself (``report.returned == "original"``); it saves too."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).eval()
    save(model, tmp_path / "p")
    recipe = json.loads((tmp_path / "p" / "recipe.json").read_text())
    assert recipe["source"]["model"] == "torch.nn.modules.container.Sequential"
    x = torch.randn(3, 4)
    assert same(load(tmp_path / "p"), model, x)


def test_format_1_recipes_still_load(tmp_path, folded_cnn):
    gm, x = folded_cnn
    save(gm, tmp_path / "o")
    path = tmp_path / "o" / "recipe.json"
    recipe = json.loads(path.read_text())
    recipe["format"] = "nepenthe.folded/1"
    del recipe["attributes"], recipe["source"]
    path.write_text(json.dumps(recipe))
    assert same(load(tmp_path / "o"), gm, x)


# --------------------------------------------------------------------------------------------------
# Modules taken from the original model
# --------------------------------------------------------------------------------------------------


def test_module_outside_the_registry_is_taken_from_the_original(tmp_path, folded_mha):
    model, gm, x = folded_mha
    save(gm, tmp_path / "m")
    recipe = json.loads((tmp_path / "m" / "recipe.json").read_text())
    assert recipe["modules"]["attn"] == {"class": FROM_ORIGINAL,
                                         "type": "torch.nn.modules.activation.MultiheadAttention"}

    with pytest.raises(RecipeError, match=r"'attn' \(torch\.nn\.modules\.activation\.MultiheadAttention\).*original="):
        load(tmp_path / "m")

    fresh = MHANet()  # other random weights: every weight must come from weights.pt
    assert not torch.equal(fresh.attn.in_proj_weight, gm.attn.in_proj_weight)
    by_instance = load(tmp_path / "m", original=fresh)
    assert same(by_instance, gm, x)
    assert by_instance.attn is not fresh.attn and not by_instance.training
    assert not torch.equal(fresh.attn.in_proj_weight, gm.attn.in_proj_weight)  # the original is untouched

    calls = []
    by_constructor = load(tmp_path / "m", original=lambda: calls.append(1) or MHANet())
    assert same(by_constructor, gm, x) and calls == [1]
    assert same(load(tmp_path / "m", original=MHANet), gm, x)  # a class is a zero-argument constructor


def test_original_not_called_when_not_needed(tmp_path, folded_cnn):
    save(folded_cnn[0], tmp_path / "c")
    load(tmp_path / "c", original=lambda: pytest.fail("the constructor must not be called"))


def test_custom_leaf_module_with_non_persistent_buffer(tmp_path, folded_leaf):
    model, gm, x = folded_leaf
    save(gm, tmp_path / "l", original=model)
    assert (tmp_path / "l" / "constants.pt").exists()
    recipe = json.loads((tmp_path / "l" / "recipe.json").read_text())
    assert recipe["modules"]["heads"]["type"].endswith("TalkingHeads")
    assert recipe["attributes"]["heads.phase"] == {"kind": "constant", "shape": [8], "dtype": "float32"}
    assert recipe["source"]["model"].endswith(".LeafNet")
    torch.manual_seed(9)
    other = LeafNet()
    with torch.no_grad():
        other.heads.phase.fill_(7.0)  # non-persistent buffers come from constants.pt, not from the original
    loaded = load(tmp_path / "l", original=other)
    assert same(loaded, gm, x)
    assert torch.equal(loaded.heads.phase, gm.heads.phase)
    assert "heads.phase" not in loaded.state_dict()  # still non-persistent


def test_original_with_another_class_is_refused(tmp_path, folded_leaf):
    _, gm, _ = folded_leaf
    save(gm, tmp_path / "l")
    with pytest.raises(RecipeError, match=r"submodule 'heads' of the original model is a .*OtherHeads.*TalkingHeads"):
        load(tmp_path / "l", original=LeafNet(OtherHeads))
    with pytest.raises(RecipeError, match="original model has no submodule 'heads'"):
        load(tmp_path / "l", original=nn.Sequential(nn.Linear(6, 3)))
    with pytest.raises(RecipeError, match="zero-argument function"):
        load(tmp_path / "l", original=lambda: "not a module")
    with pytest.raises(RecipeError, match="has no submodule 'heads'"):  # save checks the original it is given
        save(gm, tmp_path / "l2", original=nn.Sequential())


def test_masks_of_the_original_are_dropped_like_folding_does(tmp_path, folded_mha):
    _, gm, x = folded_mha
    save(gm, tmp_path / "m")
    pruned = MHANet()
    set_mask(pruned.attn.out_proj, torch.rand(8, 8) > 0.5)
    loaded = load(tmp_path / "m", original=pruned)
    assert get_mask(loaded.attn.out_proj) is None and get_mask(pruned.attn.out_proj) is not None
    assert same(loaded, gm, x)


def window_bias(table: torch.Tensor, n: int) -> torch.Tensor:
    """A helper the model's code keeps out of tracing (like torchvision Swin's attention helpers)."""
    return table[:n].sum(0)


def unrelated_helper(x: torch.Tensor) -> torch.Tensor:
    """Defined beside window_bias, but no model's graph calls it."""
    return x * 0


fx.wrap("window_bias")  # a leaf call_function in every trace of WrappedNet


class WrappedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6)
        self.table = nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))) + window_bias(self.table, 3)


def test_functions_of_the_models_code_come_from_the_original(tmp_path):
    model, x = WrappedNet(), torch.randn(5, 6)
    gm = fold(model, x, {"act": "on"})
    save(gm, tmp_path / "w", original=model)
    recipe = json.loads((tmp_path / "w" / "recipe.json").read_text())
    name = f"{FROM_ORIGINAL}{__name__}:window_bias"
    assert [n["target"] for n in recipe["nodes"] if n["op"] == "call_function"] == [name, "operator.add"]

    with pytest.raises(RecipeError, match=rf"'{__name__}:window_bias' \(function\).*original="):
        load(tmp_path / "w")
    loaded = load(tmp_path / "w", original=WrappedNet)  # other random weights: all come from weights.pt
    assert same(loaded, gm, x)
    assert same(torch.export.export(loaded, (x,)).module(), gm, x)

    with pytest.raises(RecipeError, match="traced graph does not call"):  # save checks the original it is given
        save(gm, tmp_path / "w2", original=MLPBlock())


@pytest.mark.parametrize("target", [f"{__name__}:unrelated_helper", "os:system", "builtins:eval", "nepenthe:fold",
                                    f"{__name__}:WrappedNet", f"{__name__}:window_bias.__globals__"])
def test_only_functions_the_original_graph_calls_can_be_named(tmp_path, target):
    model, x = WrappedNet(), torch.randn(5, 6)
    save(fold(model, x, {"act": "on"}), tmp_path / "w")
    _tamper(tmp_path / "w", lambda r: _first(r, "call_function").update({"target": FROM_ORIGINAL + target}))
    with pytest.raises(RecipeError, match="does not call"):
        load(tmp_path / "w", original=model)


def test_registered_class_needs_no_original(tmp_path):
    class Scale(nn.Module):
        def __init__(self, n: int, dim: int = -1):
            super().__init__()
            self.dim = dim
            self.s = nn.Parameter(torch.randn(n))

        def forward(self, x):
            return x * self.s

    model = Scale(5)
    gm = LeafTracerFor(Scale).graph_module(nn.Sequential(nn.Linear(3, 5), model))
    save(gm, tmp_path / "before")
    assert json.loads((tmp_path / "before" / "recipe.json").read_text())["modules"]["1"]["class"] == FROM_ORIGINAL
    try:
        register_module(Scale, lambda m: dict(n=m.s.numel(), dim=m.dim))
        save(gm, tmp_path / "after")
        loaded = load(tmp_path / "after")
        assert isinstance(loaded.get_submodule("1"), Scale)
        x = torch.randn(2, 3)
        assert same(loaded, gm, x)

        class Scale2(nn.Module):  # another class with the same __name__
            pass

        Scale2.__name__ = "Scale"
        with pytest.raises(ValueError, match="already registered"):
            register_module(Scale2, lambda m: {})
        with pytest.raises(TypeError):
            register_module(int, lambda m: {})

        register_module(Scale, lambda m: dict(n=m.s.numel() + 1, dim=m.dim))  # a wrong to_kwargs
        with pytest.raises(RecipeError, match=r"'1' \(Scale\).*shape"):
            save(gm, tmp_path / "wrong")
    finally:
        _MODULES.pop("Scale", None)


class LeafTracerFor:
    def __init__(self, cls):
        self.cls = cls

    def graph_module(self, model):
        cls = self.cls

        class Tracer(fx.Tracer):
            def is_leaf_module(self, m, qualname):
                return isinstance(m, cls) or super().is_leaf_module(m, qualname)

        return fx.GraphModule(model, Tracer().trace(model))


# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------


def _tamper(directory, edit) -> None:
    path = directory / "recipe.json"
    recipe = json.loads(path.read_text())
    edit(recipe)
    path.write_text(json.dumps(recipe))


def _first(recipe, op, target=None):
    return next(n for n in recipe["nodes"] if n["op"] == op and (target is None or n["target"] == target))


def _set_arg(node, index, value):
    node["args"]["tuple"][index] = value


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda r: r["modules"]["qkv"].update({"class": "os.system"}), "allow-list"),
        (lambda r: _first(r, "call_module").update({"op": "call_function", "target": "os.system"}), "allow-list"),
        (lambda r: _first(r, "call_module").update({"op": "call_function", "target": "builtins.eval"}), "allow-list"),
        (lambda r: _first(r, "call_module").update({"op": "call_method", "target": "__reduce_ex__"}), "allow-list"),
        (lambda r: _first(r, "call_module").update({"op": "call_method", "target": "apply_"}), "allow-list"),
        (lambda r: _first(r, "get_attr").update({"target": "__class__.__init__.__globals__"}), "attribute"),
        (lambda r: _first(r, "get_attr").update({"target": "qkv.in_features"}), "neither in weights.pt"),
        (lambda r: _first(r, "get_attr").update({"target": 'x") or print("pwned'}), "attribute"),
        (lambda r: _set_arg(_first(r, "call_function", "builtins.getattr"), 1, "__class__"), "reads attribute"),
        (lambda r: _first(r, "call_module").update({"target": "__class__"}), "module"),
        (lambda r: r["modules"].update({"__class__": r["modules"]["qkv"]}), "plain dotted module path"),
        (lambda r: r["modules"]["qkv"]["kwargs"].update({"dtype": "os.system"}), "module"),
        (lambda r: _first(r, "placeholder").update({"target": "x=print('pwned')"}), "identifier"),
        (lambda r: _first(r, "call_function").update({"kwargs": {"dict": {"a=print(1)": 1}}}), "identifier"),
        (lambda r: _first(r, "call_function").update({"name": "f(); print(1)"}), "identifier"),
        (lambda r: _first(r, "call_function", "torch.roll").update(
            {"kwargs": {"dict": {"shifts": 1, "dims": {"dtype": "_dynamo"}}}}), "unknown dtype"),
        (lambda r: _first(r, "call_function").update({"args": {"tuple": [{"node": "nowhere"}]}}), "before defining"),
        (lambda r: _first(r, "call_function").update({"args": {"tuple": [{"code": "print(1)"}]}}), "malformed"),
        (lambda r: r["attributes"]["table"].update({"kind": "pickle"}), "malformed description"),
        (lambda r: r["attributes"]["table"].update({"shape": [3, 2]}), "declares"),
        (lambda r: r["attributes"].update({"extra": {"kind": "constant", "shape": [1], "dtype": "float32"}}),
         "constants.pt"),
        (lambda r: r.update({"nodes": {"not": "a list"}}), "malformed"),
        (lambda r: r.update({"format": "pickle"}), "not a nepenthe"),
    ],
    ids=["module-class", "function", "builtins-eval", "method", "method-with-callable", "get_attr-dunder",
         "get_attr-non-state", "get_attr-injection", "getattr-dunder", "undeclared-module", "module-path",
         "kwargs", "placeholder-injection", "kwarg-name-injection", "node-name", "dtype-by-name", "undefined-node",
         "unknown-tag", "attribute-kind", "attribute-shape", "missing-constant", "nodes-not-list", "format"],
)
def test_tampered_recipe_is_refused(tmp_path, folded_attention, edit, match):
    save(folded_attention[0], tmp_path / "t")
    _tamper(tmp_path / "t", edit)
    with pytest.raises(RecipeError, match=match):
        load(tmp_path / "t")


class Payload:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the hand-made pickle below
def test_weights_are_read_with_weights_only(tmp_path, folded_cnn, capsys):
    gm, _ = folded_cnn
    save(gm, tmp_path / "w")
    weights = tmp_path / "w" / "weights.pt"
    state = torch.load(weights, weights_only=True)

    torch.save({**state, "payload": Payload()}, weights)  # a pickle that would run code
    with pytest.raises(RecipeError, match="plain tensors: .*print"):  # refused by name, before torch.load
        load(tmp_path / "w")
    assert "unpickled code ran" not in capsys.readouterr().out

    torch.save({**state, "fc.weight": 3}, weights)  # allowed by weights_only, but not a tensor
    with pytest.raises(RecipeError, match="dict of named tensors"):
        load(tmp_path / "w")

    torch.save({k: v for k, v in state.items() if k != "fc.bias"}, weights)
    with pytest.raises(RecipeError, match="list different tensors.*fc.bias"):
        load(tmp_path / "w")

    weights.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(RecipeError, match="zip end record"):
        load(tmp_path / "w")
    assert "unpickled code ran" not in capsys.readouterr().out

    weights.unlink()
    with pytest.raises(RecipeError, match="missing"):
        load(tmp_path / "w")


def test_load_missing_or_broken_recipe(tmp_path):
    with pytest.raises(RecipeError, match="no recipe.json"):
        load(tmp_path)
    (tmp_path / "recipe.json").write_text("{not json")
    with pytest.raises(RecipeError, match="not valid JSON"):
        load(tmp_path)


def test_save_refuses_what_a_recipe_cannot_describe(tmp_path):
    class FFT(nn.Module):
        def forward(self, x):
            return torch.fft.fft(x).real

    with pytest.raises(RecipeError, match="fft"):
        save(fx.symbolic_trace(FFT()), tmp_path / "x")

    class Apply(nn.Module):
        def forward(self, x):
            return x.numpy()

    with pytest.raises(RecipeError, match="method 'numpy'"):
        save(fx.symbolic_trace(Apply()), tmp_path / "x")

    class Strides(nn.Module):
        def forward(self, x):
            return x.view(x.stride())

    with pytest.raises(RecipeError, match="stride"):
        save(fx.symbolic_trace(Strides()), tmp_path / "x")

    class Grad(nn.Module):
        def forward(self, x):
            return x + x.grad_fn

    with pytest.raises(RecipeError, match="grad_fn"):
        save(fx.symbolic_trace(Grad()), tmp_path / "x")

    graph = fx.Graph()  # a function no name can bring back
    graph.output(graph.call_function(lambda t: t + 1, (graph.placeholder("x"),)))
    with pytest.raises(RecipeError, match="<lambda>.*module-level Python function"):
        save(fx.GraphModule(nn.Module(), graph), tmp_path / "x")


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["folded_cnn", "folded_mlp_block"])
def test_folded_model_exports_with_torch_export(request, which):
    gm, x = request.getfixturevalue(which)
    exported = torch.export.export(gm, (x,))
    with torch.no_grad():
        assert rel_err(exported.module()(x), gm(x)) <= FP32_TOL


def test_loaded_model_exports_with_torch_export(tmp_path, folded_attention, folded_mha):
    gm, x = folded_attention
    save(gm, tmp_path / "a")
    loaded = load(tmp_path / "a")
    with torch.no_grad():
        assert rel_err(torch.export.export(loaded, (x,)).module()(x), gm(x)) <= FP32_TOL
    model, gm, x = folded_mha
    save(gm, tmp_path / "m")
    loaded = load(tmp_path / "m", original=MHANet)
    with torch.no_grad():
        assert rel_err(torch.export.export(loaded, (x,)).module()(x), gm(x)) <= FP32_TOL


def _run_onnx(path, x: torch.Tensor):
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(path))
    feed = {model.graph.input[0].name: x.numpy()}
    try:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, feed)[0])
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        return torch.from_numpy(ReferenceEvaluator(model).run(None, feed)[0])


@pytest.mark.parametrize("which", ["folded_cnn", "loaded_attention"])
def test_export_onnx_matches_the_folded_model(tmp_path, request, folded_attention, which):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    if which == "folded_cnn":
        model, x = request.getfixturevalue(which)
    else:
        gm, x = folded_attention
        save(gm, tmp_path / "a")
        model = load(tmp_path / "a")
    path = export_onnx(model, x, tmp_path / "model.onnx")
    assert path.exists() and not model.training
    with torch.no_grad():
        ref = model(x)
    out = _run_onnx(path, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_export_onnx_dynamic_batch(tmp_path, folded_cnn):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    gm, x = folded_cnn
    path = export_onnx(gm, x, tmp_path / "dyn.onnx", dynamic_batch=True)
    x2 = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(_run_onnx(path, x2), gm(x2), rtol=1e-4, atol=1e-5)


def test_export_onnx_without_onnx_says_what_to_install(tmp_path, folded_cnn, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(ImportError, match="pip install onnx onnxscript"):
        export_onnx(folded_cnn[0], folded_cnn[1], tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
