"""``save`` / ``load`` of a folded model: the folder of weights.pt, constants.pt and recipe.json
described in :mod:`nepenthe.fold.recipe`, written atomically and read without unpickling code."""

from __future__ import annotations

import copy
import json
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from ..checkpoint import atomic_torch_save, atomic_write_json
from ..errors import RecipeError
from ..graph import trace
from ..mask_interop import refuse_foreign_pruning, unwrap_model
from .patch import PATCH_FORMAT, apply_patch, is_module_patch, patch_recipe
from .recipe import (
    _READABLE_FORMATS,
    FORMAT,
    FROM_ORIGINAL,
    _check_functions,
    _describe,
    _from_original,
    _rebuild,
    _source,
)

__all__ = ["load", "save"]


def save(model: nn.Module, directory: str | Path, extra: dict | None = None, *,
         original: nn.Module | None = None) -> Path:
    """Write a folded model into ``directory``: ``recipe.json``, ``weights.pt`` (its ``state_dict``)
    and, when the model holds tensors outside its state_dict, ``constants.pt`` (all written atomically).
    ``model`` is what :func:`nepenthe.fold` returned: a ``torch.fx.GraphModule``, or any
    fx-traceable module (e.g. the copy of the model that ``fold`` returns when folding is not
    faster), which is traced first.

    Modules whose class is not registered (:func:`register_module`: the common ``torch.nn`` layers
    and nepenthe's own) are recorded by name and class, and :func:`load` takes them from the
    original model. ``extra`` (JSON-able) is stored as the recipe's ``"extra"``. ``original``
    (optional): the model that was folded; its class is recorded in the recipe's ``source`` and
    every module to be taken from it is checked to be there now, rather than at load time.
    Raises :class:`RecipeError` for graphs that recipes cannot describe (a function outside the
    allow-list, an attribute that is not a tensor, ...).
    """
    directory = Path(directory)
    model = unwrap_model(model)
    refuse_foreign_pruning(model, "save")
    report = getattr(model, "fold_report", None)
    if is_module_patch(model):  # folded without a graph: saved as a patch of its architecture
        recipe = patch_recipe(model)
        recipe["source"] = _source(model, original if original is not None else model)
        return _write(model, directory, recipe, {}, report, extra)
    if not isinstance(model, fx.GraphModule):  # e.g. fold() kept the original model (report.returned)
        source = _source(model, original if original is not None else model)
        model = trace(copy.deepcopy(model), "saving")
    else:
        source = _source(model, original)
    recipe, constants = _describe(model)
    recipe["source"] = source
    if original is not None:
        for target, spec in recipe["modules"].items():
            if spec["class"] == FROM_ORIGINAL:
                _from_original(original, target, target.split("."), spec["type"])
        _check_functions(original, sorted({n["target"] for n in recipe["nodes"] if n["op"] == "call_function"
                                           and n["target"].startswith(FROM_ORIGINAL)}))
    return _write(model, directory, recipe, constants, report, extra)


def _write(model: nn.Module, directory: Path, recipe: dict, constants: dict, report, extra: dict | None) -> Path:
    if report is not None:
        recipe["fold_report"] = report.to_dict()
    if extra:
        recipe["extra"] = extra
    try:
        json.dumps(recipe)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"the recipe is not JSON-able (check `extra` and registered to_kwargs): {exc}") from exc
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, directory / "weights.pt")
    if constants:
        atomic_torch_save(constants, directory / "constants.pt")
    else:
        (directory / "constants.pt").unlink(missing_ok=True)  # a stale one from an earlier save
    atomic_write_json(recipe, directory / "recipe.json")
    return directory


MAX_RECIPE_BYTES = 64 * 2**20  # a recipe is JSON text: far smaller than this even for large models


def _checked_file(path: Path, directory: Path) -> Path:
    """``path`` when it is a regular file inside ``directory`` (a symlink may point elsewhere in the
    folder, not out of it); RecipeError otherwise. Checked before anything is read, so that a FIFO
    cannot block, a device cannot be read without end and a link cannot pull in another file."""
    if not path.exists() and not path.is_symlink():
        raise RecipeError(f"{path} is missing; pass the folder written by nepenthe.save")
    resolved = path.resolve()
    if directory.resolve() not in resolved.parents:
        raise RecipeError(f"{path} points outside {directory} (to {resolved}); nepenthe.save writes plain files")
    mode = resolved.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise RecipeError(f"{path} is {kind}; nepenthe.save writes regular files")
    return resolved


def _check_tensor_archive(path: Path) -> None:
    """torch.save's zip archive stores its entries uncompressed: a compressed entry (which could
    expand to far more memory than the file's size) means the file was not written by nepenthe.save."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except zipfile.BadZipFile:
        return  # torch.load refuses it below with its own message
    packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED or i.file_size != i.compress_size]
    if packed:
        raise RecipeError(f"{path} has compressed entries ({packed[:3]}); torch.save never compresses, so it was "
                          "altered: refused before reading")


def _load_tensors(path: Path, map_location) -> dict[str, torch.Tensor]:
    path = _checked_file(path, path.parent)
    _check_tensor_archive(path)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise RecipeError(f"{path} is missing; pass the folder written by nepenthe.save") from None
    except Exception as exc:  # weights_only refusal (pickle.UnpicklingError), corrupt zip, ...
        raise RecipeError(f"{path} cannot be read as plain tensors with torch.load(weights_only=True) "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); it was not "
                          "written by nepenthe.save or has been altered") from exc
    if not (isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in data.items())):
        raise RecipeError(f"{path} must hold a dict of named tensors")
    return data


def load(directory: str | Path, original: nn.Module | Callable[[], nn.Module] | None = None,
         map_location: str | torch.device = "cpu") -> fx.GraphModule:
    """Rebuild a folded model saved by :func:`save`, in eval mode (no code is unpickled).

    ``original``: needed only when the folded model keeps modules outside the registry (a custom
    attention block, ``nn.MultiheadAttention``, ...) or calls functions of the model's own code
    (``torch.fx.wrap``-ped helpers such as torchvision Swin's attention); the error says which.
    Pass the original (unfolded) model, built with the same arguments, or a zero-argument function
    that builds it (called only when needed). Those modules are deep-copied from it after checking
    their class, and those functions must be ones that its traced graph calls; every weight, also
    the modules', comes from ``weights.pt`` (``torch.load(weights_only=True)``).
    ``map_location``: device for the loaded model. Raises :class:`RecipeError` for anything
    missing, malformed or outside the allow-lists.
    """
    if isinstance(original, (str, torch.device)):
        raise TypeError(f"load(directory, original=None, map_location='cpu'): got {original!r} as `original`; "
                        "pass the device as map_location=")
    directory = Path(directory)
    if not (directory / "recipe.json").exists() and not (directory / "recipe.json").is_symlink():
        raise RecipeError(f"{directory} has no recipe.json; pass the folder written by nepenthe.save")
    recipe_path = _checked_file(directory / "recipe.json", directory)
    if recipe_path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{recipe_path} is {recipe_path.stat().st_size} bytes, over the {MAX_RECIPE_BYTES} a recipe "
                          "can be; it was not written by nepenthe.save")
    try:
        recipe = json.loads(recipe_path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # bad JSON, a 5000-digit number, deep nesting
        raise RecipeError(f"{directory / 'recipe.json'} is not valid JSON: {type(exc).__name__}: "
                          f"{str(exc)[:200]}") from None
    if not isinstance(recipe, dict) or recipe.get("format") not in (*_READABLE_FORMATS, PATCH_FORMAT):
        raise RecipeError(f"not a nepenthe folded-model recipe (expected format {FORMAT!r})")
    state = _load_tensors(directory / "weights.pt", map_location)
    if recipe["format"] == PATCH_FORMAT:
        model = apply_patch(recipe, state, original, str(directory))
        return model.to(map_location) if isinstance(map_location, (str, torch.device)) else model
    attributes = recipe.get("attributes", {})
    wants_constants = isinstance(attributes, dict) and any(
        isinstance(v, dict) and v.get("kind") == "constant" for v in attributes.values())
    constants = _load_tensors(directory / "constants.pt", map_location) if wants_constants else {}
    for key, info in (attributes.items() if isinstance(attributes, dict) else ()):
        if not isinstance(info, dict):
            continue  # refused with a clear message while rebuilding
        tensor = (constants if info.get("kind") == "constant" else state).get(key)
        dtype = str(tensor.dtype).removeprefix("torch.") if tensor is not None else None
        if tensor is not None and (info.get("shape") != list(tensor.shape) or info.get("dtype") != dtype):
            raise RecipeError(f"tensor {key!r} in the saved files is {dtype} {list(tensor.shape)}, but the "
                              f"recipe declares {info.get('dtype')} {info.get('shape')}")
    try:
        gm = _rebuild(recipe, state, constants, original)
    except RecipeError:
        raise
    except (KeyError, TypeError, AttributeError, IndexError, ValueError, RecursionError, SyntaxError) as exc:
        raise RecipeError(f"malformed recipe: {type(exc).__name__}: {str(exc)[:300]}") from None
    try:
        gm.load_state_dict(state, strict=True, assign=True)  # assign: keep the saved dtypes and devices
    except RuntimeError as exc:
        raise RecipeError(f"weights.pt does not match the recipe: {exc}") from exc
    left = [k for k, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
            if t.is_meta]
    if left:
        raise RecipeError(f"tensors {left[:5]} were not restored from the saved files (a registered module that "
                          "creates tensors outside its state_dict?)")
    if isinstance(map_location, (str, torch.device)):
        gm.to(map_location)  # what came from the original model, too
    gm.eval()
    return gm
