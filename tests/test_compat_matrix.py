"""The compatibility matrix: real model codebases (torchvision, timm, Hugging Face transformers),
built small from their own constructors with random weights (no downloads), each taken through
measure → one pruning step → fold → save / load. A row whose package is not installed skips.

``docs/models.md`` carries the table :func:`table` makes from ``MATRIX`` (the facts the tests
below check); ``python -m tests.test_compat_matrix`` prints it, and a test keeps the page current.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import nepenthe
from nepenthe._utils import set_submodule
from nepenthe.fold.preview import forced_stats, linearized
from nepenthe.masks import get_masks


def _torchvision():
    from tests.conftest import import_torchvision_models

    models = import_torchvision_models()
    if models is None:
        pytest.skip("torchvision is not installed")
    return models


def _timm():
    _torchvision()  # timm imports torchvision: the CPU-build workaround first
    return pytest.importorskip("timm")


def _transformers():
    from tests.test_untraceable_models import _transformers as imported

    return imported()


def _tv_vit():
    model = _torchvision().VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                             mlp_dim=64, num_classes=10)  # vit_b_16's class, small
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision initialises the head to zero
    return model


_HF_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _hf(kind: str):
    tf = _transformers()
    text = dict(vocab_size=100, max_position_embeddings=64)
    return {"BertModel": lambda: tf.BertModel(tf.BertConfig(**text, **_HF_SMALL)),
            "RobertaModel": lambda: tf.RobertaModel(tf.RobertaConfig(**text, **_HF_SMALL)),
            "ViTModel": lambda: tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, **_HF_SMALL)),
            "LlamaModel": lambda: tf.LlamaModel(tf.LlamaConfig(**text, num_key_value_heads=2, **_HF_SMALL)),
            }[kind]()


def _image():
    return torch.randn(2, 3, 32, 32)


def _tokens():
    return torch.randint(0, 100, (2, 16))


@dataclass(frozen=True)
class Case:
    package: str
    model: str  # how it is built, as shown in the table
    build: Callable[[], nn.Module]
    batch: Callable[[], torch.Tensor]
    sites: int  # rectifier call sites measure finds
    kind: str
    route: str  # "graph" (torch.fx) or "modules" (hooks; MLP blocks folded module by module)
    folds: int  # rectifier layers fold removes when the forced sites are always ON
    note: str = ""

    @property
    def id(self) -> str:
        return f"{self.package}-{self.model.split('(')[0].split()[0]}"


MATRIX = [
    Case("torchvision", "resnet18(num_classes=10)", lambda: _torchvision().resnet18(num_classes=10), _image,
         17, "relu", "graph", 6),
    Case("torchvision", "mobilenet_v2(num_classes=10)", lambda: _torchvision().mobilenet_v2(num_classes=10), _image,
         35, "relu6", "graph", 12),
    Case("torchvision", "VisionTransformer (vit_b_16's class, 2 layers)", _tv_vit, _image, 2, "gelu", "graph", 1),
    Case("timm", "resnet18", lambda: _timm().create_model("resnet18", num_classes=10), _image,
         17, "relu", "graph", 6),
    Case("timm", "convnext_atto", lambda: _timm().create_model("convnext_atto", num_classes=10), _image,
         12, "gelu", "graph", 4),
    Case("timm", "vit_tiny_patch16_224(img_size=32, patch_size=8)",
         lambda: _timm().create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10), _image,
         12, "gelu", "graph", 4),
    Case("transformers", "BertModel (2 layers)", lambda: _hf("BertModel"), _tokens, 2, "gelu", "modules", 2),
    Case("transformers", "RobertaModel (2 layers)", lambda: _hf("RobertaModel"), _tokens, 2, "gelu", "modules", 2),
    Case("transformers", "ViTModel (2 layers)", lambda: _hf("ViTModel"), _image, 2, "gelu", "modules", 2),
    Case("transformers", "LlamaModel (2 layers)", lambda: _hf("LlamaModel"), _tokens, 2, "silu", "modules", 0,
         "gated MLP: `act(gate) * up` is a product, reported as not foldable"),
]


def _out(result) -> torch.Tensor:
    return result if isinstance(result, torch.Tensor) else result.last_hidden_state


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("case", MATRIX, ids=lambda c: c.id)
def test_measure_prune_fold_save_load(case: Case, tmp_path):
    torch.manual_seed(0)
    model = case.build().eval()
    data = [case.batch(), case.batch()]
    stats = nepenthe.measure(model, data)
    assert len(stats.histogram) == case.sites and {s.rectifier.kind for s in stats.sites.values()} == {case.kind}

    step = nepenthe.prune_step(model, data, config=nepenthe.PruneConfig(zeta=0.5))
    masks = get_masks(model)
    assert masks and sum(step.pruned.values()) > 0
    for name, mask in masks.items():  # the masked weights hold zeros
        assert not model.get_submodule(name).weight[~mask].any(), name

    # every third call site (every site without a graph) always ON: fold removes them, exactly
    sites = list(stats.histogram)
    forced = sites if case.route == "modules" else sites[1::3]
    x = data[0]
    states = forced_stats(model, x, {s: "on" for s in forced})
    folded = nepenthe.fold(model, states, x, verify=False, planner="all", approximate=True)
    report = folded.fold_report
    assert report.route == case.route and report.rectifier_layers_removed == case.folds, report.skipped
    fresh = data[1]
    with torch.no_grad():
        if case.route == "graph":
            assert _rel_err(folded(fresh), linearized(model, states, approximate=True)(fresh)) <= 1e-4
        else:  # no graph to linearize: an always-ON rectifier is the identity, so replace the modules
            reference = copy.deepcopy(model)
            for site in report.removed:  # (Llama: none, the gated MLP stays as it was)
                set_submodule(reference, stats.sites[site].module_path, nn.Identity())
            assert _rel_err(_out(folded(fresh)), _out(reference(fresh))) <= 1e-4
        if case.folds and case.route == "graph":  # shallower (merged convs may hold more parameters)
            assert report.critical_path_after < report.critical_path_before
        elif case.folds:  # two Linears through a narrow ... wide ... narrow MLP: one smaller Linear
            assert report.params_after < report.params_before

    nepenthe.save(folded, tmp_path, original=model)
    loaded = nepenthe.load(tmp_path, original=case.build)
    with torch.no_grad():
        assert torch.equal(_out(loaded(fresh)), _out(folded(fresh)))


def table() -> str:
    """The tested-models table of docs/models.md."""
    rows = ["| package | model (random weights, built small) | rectifier sites | kind | route | "
            "layers folded in the test | notes |", "|---|---|---|---|---|---|---|"]
    for c in MATRIX:
        route = "torch.fx graph" if c.route == "graph" else "hooks, MLP blocks by modules"
        forced = "every third site forced ON" if c.route == "graph" else "every site forced ON"
        rows.append(f"| {c.package} | `{c.model}` | {c.sites} | {c.kind} | {route} | {c.folds} ({forced}) | "
                    f"{c.note} |")
    return "\n".join(rows) + "\n"


def test_docs_table_is_current():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    assert table() in page, "docs/models.md is out of date: paste in `python -m tests.test_compat_matrix`"


if __name__ == "__main__":
    print(table(), end="")
