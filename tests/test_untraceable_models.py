"""Models torch.fx cannot trace (data-dependent Python control flow, Hugging Face transformers):
measure finds each rectifier and, by running the model, the Conv/Linear that feeds it, so the
entropy methods prune them too (without the cut check)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import nepenthe
from nepenthe.masks import get_masks


class Branchy(nn.Module):
    """Linear -> GELU-like module -> Linear, with Python control flow on a tensor value."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3)
        self.fc3, self.act2 = nn.Linear(6, 16), nn.ReLU()

    def forward(self, x):
        if x.sum() > -1e9:  # fx cannot trace a branch on a tensor's value
            h = self.act(self.fc1(x))
        else:
            h = x
        return self.fc2(h) + self.fc2(self.act2(self.fc3(x) * 2))  # act2's input is no layer's output


def test_untraceable_model_is_measured_with_producers_and_pruned():
    torch.manual_seed(0)
    model = Branchy()
    data = [torch.randn(32, 6) for _ in range(2)]
    with pytest.warns(UserWarning, match="hooks|forward hooks|trace"):
        stats = nepenthe.measure(model, data)
    assert {k: (s.producer, s.module_path) for k, s in stats.sites.items()} == {
        "act": ("fc1", "act"), "act2": (None, "act2")}
    with pytest.warns(UserWarning, match="without the cut check"):
        step = nepenthe.prune_step(model, data, config=nepenthe.PruneConfig(zeta=0.5))
    assert set(get_masks(model)) == {"fc1"} and step.pruned["fc1"] > 0


def _transformers():
    from tests.conftest import import_torchvision_models

    import_torchvision_models()  # transformers imports torchvision: the CPU-build workaround first
    return pytest.importorskip("transformers")


def _hf_models():
    tf = _transformers()
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    text = lambda: torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))  # noqa: E731
    return {
        "bert": (lambda: tf.BertModel(tf.BertConfig(vocab_size=100, max_position_embeddings=64, **small)),
                 text, "gelu"),
        "roberta": (lambda: tf.RobertaModel(tf.RobertaConfig(vocab_size=100, max_position_embeddings=64, **small)),
                    text, "gelu"),
        "vit": (lambda: tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, **small)),
                lambda: torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), "gelu"),
        "llama": (lambda: tf.LlamaModel(tf.LlamaConfig(vocab_size=100, max_position_embeddings=64,
                                                        num_key_value_heads=2, **small)), text, "silu"),
    }


@pytest.mark.parametrize("name", ["bert", "roberta", "vit", "llama"])
def test_hugging_face_models_measure_and_prune(name):
    build, batch, kind = _hf_models()[name]
    torch.manual_seed(0)
    model = build().eval()
    data = [batch(), batch()]
    stats = nepenthe.measure(model, data)
    assert len(stats.histogram) == 2 and {s.rectifier.kind for s in stats.sites.values()} == {kind}
    producers = {s.producer for s in stats.sites.values()}
    if name == "llama":  # act(gate(x)) * up(x): the gate projection feeds the SiLU
        assert all(p and p.endswith("gate_proj") for p in producers)
    else:
        assert all(p and p.endswith(("intermediate.dense", "mlp.fc1")) for p in producers), producers
    step = nepenthe.prune_step(model, data, config=nepenthe.PruneConfig(zeta=0.5))
    assert set(get_masks(model)) == producers and sum(step.pruned.values()) > 0
    with torch.no_grad():
        out = model(data[0])
    assert torch.isfinite(out.last_hidden_state).all()


def test_untraceable_model_folds_its_mlp_blocks_by_modules():
    torch.manual_seed(0)
    model = Branchy()
    with torch.no_grad():
        model.fc1.bias.fill_(50.0)  # fc1's GELU: every neuron ON on the data
        model.fc3.bias.fill_(50.0)
    data = [torch.randn(32, 6) for _ in range(2)]
    stats = nepenthe.measure(model, data)
    folded = nepenthe.fold(model, stats, data[0], approximate=True)
    report = folded.fold_report
    skipped = {s["node"]: s["reason"] for s in report.skipped}
    assert "no torch.fx graph" in skipped["(model)"] and "not a Linear's output" in skipped["act2"]
    # fc2 also serves the second branch: the block is not merged (a shared module), and says why
    assert report.merges == [] and "runs more than once" in skipped["act"] and report.returned == "original"

    class Single(nn.Module):  # the same block with fc2 used once
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x))) if x.sum() > -1e9 else x[:, :3]

    model = Single()
    with torch.no_grad():
        model.fc1.bias.fill_(50.0)  # fc1's GELU: every neuron ON on the data
    folded = nepenthe.fold(model, nepenthe.measure(model, data), data[0], approximate=True)
    report = folded.fold_report
    assert report.merges == ["fc1 + fc2"] and report.removed == ["act"] and report.returned == "folded"
    assert isinstance(folded.act, nn.Identity) and folded.fc1.out_features == 3
    torch.testing.assert_close(folded(data[1]), model(data[1]), rtol=1e-4, atol=1e-4)
    assert report.approximation_error["act"]["max_rel_error"] < 1e-6


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_hugging_face_mlp_blocks_fold_or_say_why(name):
    build, batch, kind = _hf_models()[name]
    torch.manual_seed(0)
    model = build().eval()
    layer0 = model.encoder.layer[0].intermediate.dense if name == "bert" else model.layers[0].mlp.gate_proj
    with torch.no_grad():
        layer0.bias.fill_(30.0) if layer0.bias is not None else layer0.weight.mul_(0)
    data = [batch(), batch()]
    stats = nepenthe.measure(model, data)
    folded = nepenthe.fold(model, stats, data[0], approximate=True)
    report = folded.fold_report
    skipped = {s["node"]: s["reason"] for s in report.skipped}
    if name == "bert":  # Linear -> GELU -> Linear: one Linear, exact up to GELU on the data
        assert report.merges == ["encoder.layer.0.intermediate.dense + encoder.layer.0.output.dense"]
        assert report.max_rel_error < 1e-5 and report.params_after < report.params_before
        with torch.no_grad():
            torch.testing.assert_close(folded(data[1]).last_hidden_state, model(data[1]).last_hidden_state,
                                       rtol=1e-4, atol=1e-4)
    else:  # down(act(gate(x)) * up(x)): the product cannot fold into one Linear, and the report says so
        assert report.merges == [] and report.returned == "original"
        assert "does not feed exactly one Linear" in skipped["layers.0.mlp.act_fn"]


def test_module_folded_model_saves_as_a_patch_and_refuses_what_does_not_fit(tmp_path):
    import json

    from nepenthe.errors import RecipeError

    tf = _transformers()
    build, batch, _ = _hf_models()["bert"]
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        model.encoder.layer[0].intermediate.dense.bias.fill_(30.0)
    data = [batch(), batch()]
    folded = nepenthe.fold(model, nepenthe.measure(model, data), data[0], approximate=True)
    nepenthe.save(folded, tmp_path)
    recipe = json.loads((tmp_path / "recipe.json").read_text())
    assert recipe["format"] == "nepenthe.module-patch/1" and len(recipe["blocks"]) == 1
    with torch.no_grad():
        assert torch.equal(nepenthe.load(tmp_path, original=build)(data[1]).last_hidden_state,
                           folded(data[1]).last_hidden_state)
    with pytest.raises(RecipeError, match="needs its architecture"):
        nepenthe.load(tmp_path)
    wider = lambda: tf.BertModel(tf.BertConfig(vocab_size=100, max_position_embeddings=64, hidden_size=32,  # noqa: E731
                                               num_hidden_layers=2, num_attention_heads=2, intermediate_size=96))
    with pytest.raises(RecipeError, match="shape"):
        nepenthe.load(tmp_path, original=wider)
    for role, value, match in [("producer", "embeddings.word_embeddings", "must be nn.Linear"),
                               ("rectifier", "encoder.layer.1.output.dense", "not a rectifier"),
                               ("consumer", "encoder.__class__", "invalid consumer path"),
                               ("producer", "no.such.module", "no submodule")]:
        tampered = json.loads(json.dumps(recipe))
        tampered["blocks"][0][role] = value
        (tmp_path / "recipe.json").write_text(json.dumps(tampered))
        with pytest.raises(RecipeError, match=match):
            nepenthe.load(tmp_path, original=build)
