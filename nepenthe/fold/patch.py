"""Saving and loading a model folded module by module (:mod:`nepenthe.fold.blocks`: Hugging Face
transformers and other models torch.fx cannot trace).

Such a model has no graph a recipe could describe; it is the user's own class with a few
submodules replaced. So it is saved as a *patch*: for each merged block, the paths of the producer
Linear P, the rectifier A and the consumer Linear C (P becomes one Linear of P's input size and
C's output size; A and C become ``nn.Identity``), plus the whole ``state_dict``. Loading needs the
architecture — the original model or a function building it, exactly as for modules that recipes
cannot rebuild — applies the patch to it and loads every weight from ``weights.pt``.

Nothing in the recipe gives a size: the new Linear's shape comes from the original's P and C, the
patched model's ``state_dict`` must then match ``weights.pt`` key for key and shape for shape, and
only ``nn.Linear`` / ``nn.Identity`` are ever constructed (on the meta device, weights assigned).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn as nn

from .._utils import set_submodule
from ..activations import rectifier_of_module
from ..errors import RecipeError
from ..masks import remove_masks
from .recipe import built_original
from .report import FoldReport

__all__ = ["PATCH_FORMAT", "apply_patch", "is_module_patch", "patch_recipe"]

PATCH_FORMAT = "nepenthe.module-patch/1"
_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_ROLES = ("producer", "rectifier", "consumer")


def is_module_patch(model: nn.Module) -> bool:
    """Whether ``model`` is what :func:`nepenthe.fold` returned through the module route."""
    report = getattr(model, "fold_report", None)
    return isinstance(report, FoldReport) and report.route == "modules"


def patch_recipe(model: nn.Module) -> dict:
    """The JSON-able patch of a model folded by modules: one entry per merged block (from the
    report's ``merges`` and ``removed``, which ``fold_blocks`` writes in the same order), each
    checked against the model itself."""
    report: FoldReport = model.fold_report
    blocks = []
    for merge, site in zip(report.merges, report.removed):
        producer, consumer = merge.split(" + ")
        block = {"producer": producer, "rectifier": site, "consumer": consumer,
                 "bias": model.get_submodule(producer).bias is not None}
        if not (isinstance(model.get_submodule(producer), nn.Linear)
                and all(isinstance(model.get_submodule(block[r]), nn.Identity) for r in ("rectifier", "consumer"))):
            raise RecipeError(f"the model does not hold the merge {merge!r} its fold_report lists (was it changed "
                              "after folding?); fold it again and save the result")
        blocks.append(block)
    return {"format": PATCH_FORMAT, "blocks": blocks}


def _checked_blocks(recipe: dict, where: str) -> list[dict]:
    blocks = recipe.get("blocks")
    if not isinstance(blocks, list) or len(blocks) > 100_000:
        raise RecipeError(f"{where}: 'blocks' must be a list of merged blocks")
    seen: set[str] = set()
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or set(block) != {*_ROLES, "bias"} or not isinstance(block["bias"], bool):
            raise RecipeError(f"{where}: block {i} must have exactly the keys producer, rectifier, consumer, bias")
        for role in _ROLES:
            path = block[role]
            if not isinstance(path, str) or len(path) > 1000 or not _PATH.fullmatch(path) or "__" in path:
                raise RecipeError(f"{where}: block {i} has an invalid {role} path {str(path)[:80]!r}")
            if path in seen:
                raise RecipeError(f"{where}: module {path!r} appears in two merged blocks")
            seen.add(path)
    return blocks


def _submodule(model: nn.Module, path: str, role: str, i: int) -> nn.Module:
    module = model
    for part in path.split("."):  # registered children only: never getattr on a user's object
        module = module._modules.get(part) if isinstance(module, nn.Module) else None
        if module is None:
            raise RecipeError(f"block {i}: the original model has no submodule {path!r} (the {role} of a merged "
                              "block); pass the model that was folded, built with the same arguments")
    return module


def _resolved(original: nn.Module | Callable[[], nn.Module] | None, where: str) -> nn.Module:
    if original is None:
        raise RecipeError(f"{where} is a model folded module by module (no torch.fx graph): loading it needs its "
                          "architecture. Pass nepenthe.load(directory, original=model) or original=lambda: "
                          "MyModel(config); every weight comes from weights.pt")
    return built_original(original)


def apply_patch(recipe: dict, state: dict[str, torch.Tensor], original, where: str) -> nn.Module:
    """``original`` (patched in place; pass a fresh one) with every merged block of ``recipe``
    applied and every weight loaded from ``state`` (checked key by key and shape by shape)."""
    blocks = _checked_blocks(recipe, where)
    model = remove_masks(_resolved(original, where))
    new: list[tuple[str, nn.Module]] = []
    for i, block in enumerate(blocks):
        p, a, c = (_submodule(model, block[role], role, i) for role in _ROLES)
        if not (isinstance(p, nn.Linear) and isinstance(c, nn.Linear)):
            raise RecipeError(f"block {i}: {block['producer']!r} and {block['consumer']!r} must be nn.Linear in the "
                              f"original model (they are {type(p).__name__}, {type(c).__name__})")
        if rectifier_of_module(a) is None:
            raise RecipeError(f"block {i}: {block['rectifier']!r} is a {type(a).__name__}, not a rectifier")
        with torch.device("meta"):  # the shape comes from the original model, the values from weights.pt
            merged = nn.Linear(p.in_features, c.out_features, bias=block["bias"])
        new += [(block["producer"], merged), (block["rectifier"], nn.Identity()), (block["consumer"], nn.Identity())]
    for path, module in new:
        set_submodule(model, path, module)
    expected = model.state_dict(keep_vars=True)
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise RecipeError(f"{where}: weights.pt does not fit the patched model (missing {missing[:4]}, unexpected "
                          f"{extra[:4]}); pass the model that was folded, built with the same arguments")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise RecipeError(f"{where}: weights.pt has {key} of shape {tuple(state[key].shape)}, the patched model "
                              f"needs {tuple(tensor.shape)}")
    model.load_state_dict(state, assign=True)
    return model.eval()
