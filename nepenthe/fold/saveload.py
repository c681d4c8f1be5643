"""``save`` / ``load`` of a folded model: the folder of weights.pt, constants.pt and recipe.json
described in :mod:`nepenthe.fold.recipe`, written atomically and read without unpickling code."""

from __future__ import annotations

import copy
import json
import stat
from collections.abc import Callable
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from ..checkpoint import atomic_torch_save, atomic_write_json
from ..errors import RecipeError
from ..graph import trace
from ..mask_interop import refuse_foreign_pruning, unwrap_model
from .archive import WEIGHT_DTYPES, _check_loaded, _own_storages, _scan_archive, _TensorMeta
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
    if not isinstance(model, nn.Module) or not (original is None or isinstance(original, nn.Module)):
        raise TypeError(f"save(model, directory, extra=None, *, original=None): model and original must be nn.Modules "
                        f"(what nepenthe.fold returned, the model that was folded), got {type(model).__name__} and "
                        f"{type(original).__name__}")
    if not isinstance(directory, (str, Path)):
        raise TypeError(f"save: directory must be a path, got {type(directory).__name__}")
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
    atomic_torch_save(_own_storages(model.state_dict()), directory / "weights.pt")
    if constants:
        atomic_torch_save(_own_storages(constants), directory / "constants.pt")
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


def _load_tensors(path: Path, map_location, scanned: dict[str, _TensorMeta]) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # the scan passed, so this is a torch limit (e.g. an unknown map_location)
        raise RecipeError(f"{path} cannot be read with torch.load(weights_only=True): {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    _check_loaded(path, data if isinstance(data, dict) else {}, scanned)
    return data


def _read_recipe(directory: Path) -> dict:
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
    return recipe


def _declared(recipe: dict) -> dict[str, torch.dtype] | None:
    """The dtype of every saved tensor as the recipe declares it (None: a recipe older than /3)."""
    if recipe["format"] != FORMAT:
        return None
    dtypes, allowed = recipe.get("dtypes"), {str(d).removeprefix("torch."): d for d in WEIGHT_DTYPES}
    if not (isinstance(dtypes, dict) and all(isinstance(v, str) and v in allowed for v in dtypes.values())):
        raise RecipeError(f"recipe.json: 'dtypes' must map each saved tensor to one of {sorted(allowed)}; save the "
                          "model again with nepenthe.save")
    return {k: allowed[v] for k, v in dtypes.items()}


_MAX_UNDECLARED_ENTRIES = 100_000  # ~50 MB of zip directory in memory; a model with more tensors saves as /3


def _max_entries(declared: dict | None) -> int:
    """Zip entries an archive can have: one a tensor, plus torch.save's own few. Recipes older than
    /3 (and module patches) do not list their tensors (a module from the original model may hold
    hundreds), so a fixed bound applies to them."""
    return len(declared) + 16 if declared is not None else _MAX_UNDECLARED_ENTRIES


def _check_dtypes(recipe: dict, declared, weights: dict[str, _TensorMeta], constants: dict[str, _TensorMeta]) -> None:
    saved = {**weights, **constants}
    if len(saved) != len(weights) + len(constants):
        raise RecipeError(f"tensors {sorted(weights.keys() & constants.keys())[:5]} are in both weights.pt and "
                          "constants.pt; save the model again")
    if declared is not None and declared.keys() != saved.keys():
        odd = sorted(declared.keys() ^ saved.keys())[:5]
        raise RecipeError(f"recipe.json's 'dtypes' and the saved files list different tensors ({odd}); the folder "
                          "was altered: save the model again")
    for key, meta in saved.items():
        if declared is not None and declared[key] != meta.dtype:
            raise RecipeError(f"tensor {key!r} is {meta.dtype} in the saved files but {declared[key]} in recipe.json; "
                              "the folder was altered: save the model again")
    floats = {m.dtype for m in weights.values() if m.dtype.is_floating_point}
    if declared is None and len(floats) > 1:
        raise RecipeError(f"weights.pt mixes {sorted(map(str, floats))}; a recipe older than {FORMAT} does not say "
                          "which tensor has which dtype, so one dtype is expected: save the model again")
    attributes = recipe.get("attributes", {})
    attributes = attributes if isinstance(attributes, dict) else {}  # else refused while rebuilding
    undeclared = sorted(k for k in constants if not (isinstance(attributes.get(k), dict)
                                                     and attributes[k].get("kind") == "constant"))
    if undeclared:
        raise RecipeError(f"constants.pt holds {undeclared[:5]}, which recipe.json does not declare as constants; "
                          "the folder was altered: save the model again")
    for key, info in attributes.items():
        if not isinstance(info, dict):
            continue  # refused with a clear message while rebuilding
        meta = (constants if info.get("kind") == "constant" else weights).get(key)
        if meta is not None and (info.get("shape") != list(meta.shape) or info.get("dtype") !=
                                 str(meta.dtype).removeprefix("torch.")):
            raise RecipeError(f"tensor {key!r} in the saved files is {meta.dtype} {list(meta.shape)}, but the "
                              f"recipe declares {info.get('dtype')} {info.get('shape')}")


def _check_slots(gm: fx.GraphModule, weights: dict[str, _TensorMeta]) -> None:
    """Every parameter / buffer the rebuilt (meta) model has is in weights.pt with its shape and a
    dtype of its kind, and nothing else is: checked before weights.pt is read."""
    slots = gm.state_dict(keep_vars=True)
    missing, unexpected = sorted(slots.keys() - weights.keys()), sorted(weights.keys() - slots.keys())
    if missing or unexpected:
        raise RecipeError(f"weights.pt does not match the recipe: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, slot in slots.items():
        meta = weights[key]
        if not isinstance(slot, torch.Tensor) or tuple(slot.shape) != meta.shape:
            raise RecipeError(f"weights.pt does not match the recipe: tensor {key!r} is {list(meta.shape)} there, "
                              f"but the recipe's module has {list(getattr(slot, 'shape', []))}")
        if slot.dtype.is_floating_point != meta.dtype.is_floating_point or \
                (not slot.dtype.is_floating_point and slot.dtype != meta.dtype):
            raise RecipeError(f"weights.pt does not match the recipe: tensor {key!r} is {meta.dtype} there, but the "
                              f"recipe's module holds a {slot.dtype} tensor")


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
    ``map_location``: device for the loaded model (``"meta"``: shapes only, nothing read).

    Every check runs before a tensor is allocated or code is generated, in this order: the files
    (plain files inside the folder, the recipe's size), the recipe's JSON, each archive's zip
    directory and tensor headers (:mod:`~nepenthe.fold.archive`: dtypes, dense tensors with their
    own storage, sizes), the dtypes the recipe declares, the modules built on the meta device (no
    ``device=`` / ``dtype=`` arguments) against the headers' shapes, the graph (allow-lists,
    names, one output, no writes into stored tensors: :mod:`~nepenthe.fold.recipe_graph`); only
    then are the tensors read. float64 is accepted like float16 / bfloat16 / float32 (a model
    saved in double precision loads in double), but only where the recipe declares it. Raises
    :class:`RecipeError` (a :class:`~nepenthe.NepentheError`) naming the file, tensor or node and
    what to do, for anything missing, malformed or outside the allow-lists.
    """
    if isinstance(original, (str, torch.device)):
        raise TypeError(f"load(directory, original=None, map_location='cpu'): got {original!r} as `original`; "
                        "pass the device as map_location=")
    device = None
    if isinstance(map_location, (str, torch.device)):
        try:
            device = torch.device(map_location)
        except (RuntimeError, ValueError, TypeError):
            raise ValueError(f"load: map_location={map_location!r} is not a device; pass e.g. 'cpu', 'cuda', 'cuda:1' "
                             "or 'meta' (shapes only)") from None
    if not isinstance(directory, (str, Path)):
        raise TypeError(f"load: directory must be the path of a folder written by nepenthe.save, got "
                        f"{type(directory).__name__}")
    directory = Path(directory)
    recipe = _read_recipe(directory)
    declared, attributes = _declared(recipe), recipe.get("attributes", {})
    limit = _max_entries(declared)
    weights_path = _checked_file(directory / "weights.pt", directory)
    weights = _scan_archive(weights_path, limit)  # names, dtypes, shapes: nothing allocated yet
    if recipe["format"] == PATCH_FORMAT:
        model = apply_patch(recipe, _load_tensors(weights_path, map_location, weights), original, str(directory))
        return model.to(device) if device is not None else model
    wants_constants = isinstance(attributes, dict) and any(
        isinstance(v, dict) and v.get("kind") == "constant" for v in attributes.values())
    constants_path = _checked_file(directory / "constants.pt", directory) if wants_constants else None
    constants = _scan_archive(constants_path, limit) if wants_constants else {}
    _check_dtypes(recipe, declared, weights, constants)
    try:
        gm = _rebuild(recipe, {k: m.meta() for k, m in weights.items()}, {k: m.meta() for k, m in constants.items()},
                      original, check=lambda gm: _check_slots(gm, weights))
    except RecipeError:
        raise
    except (KeyError, TypeError, AttributeError, IndexError, ValueError, RecursionError, SyntaxError,
            RuntimeError, OverflowError) as exc:  # RuntimeError: e.g. a meta tensor of 2**62 x 2**62 elements
        raise RecipeError(f"malformed recipe: {type(exc).__name__}: {str(exc)[:300]}") from None
    # every check passed: only now are tensors read (as many bytes as the recipe declares)
    state = _load_tensors(weights_path, map_location, weights)
    for key, tensor in (_load_tensors(constants_path, map_location, constants) if constants else {}).items():
        owner, _, leaf = key.rpartition(".")
        gm.get_submodule(owner)._buffers[leaf] = tensor  # _rebuild registered it as a (meta) buffer
    try:
        gm.load_state_dict(state, strict=True, assign=True)  # assign: keep the saved dtypes and devices
    except RuntimeError as exc:
        raise RecipeError(f"weights.pt does not match the recipe: {exc}") from exc
    left = [k for k, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
            if t.is_meta]
    if left and not (device is not None and device.type == "meta"):
        raise RecipeError(f"tensors {left[:5]} were not restored from the saved files (a registered module that "
                          "creates tensors outside its state_dict?)")
    if device is not None:
        gm.to(device)  # what came from the original model, too
    gm.eval()
    return gm
