"""Fuzz of load() (issue 14): recipes of a real saved model mutated at random, with values that try
to reach code (os.system, builtins.open / eval / __import__, getattr chains, code in names) and to
break the structure. Each one either loads or is refused with a RecipeError; a loaded one is run
on the meta device (its generated forward executes, nothing is allocated); a canary file that
every payload would create never appears. Then the public API (load, save, register_module,
fold's options) with hostile arguments: NepentheError / TypeError / ValueError, nothing else.
Bounded: a few dozen examples each, a few seconds in all."""

from __future__ import annotations

import itertools
import json
import os
import shutil

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import nepenthe
from nepenthe.errors import NepentheError, RecipeError
from nepenthe.fold import register_module
from nepenthe.fold.allowlist import _FUNCTIONS, _METHODS

from .saved_model import make_saved

# NEPENTHE_FUZZ_EXAMPLES=3000 HYPOTHESIS_PROFILE=explore: a longer hunt than the default suite's
FUZZ = settings(max_examples=int(os.environ.get("NEPENTHE_FUZZ_EXAMPLES", 60)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


class Seed(tuple):
    def __repr__(self):  # hypothesis prints the fixture with a failing example
        return f"Seed({self[1]})"


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    directory, x, _ = make_saved(root / "base")
    return Seed((root, directory, json.loads((directory / "recipe.json").read_text()), x))


def _payloads(canary) -> list[str]:
    touch = f"touch {canary}"
    return [
        "os.system", "posix.system", "subprocess.call", "builtins.eval", "builtins.exec", "builtins.open",
        "builtins.__import__", "builtins.setattr", "builtins.compile", "importlib.import_module", "torch.load",
        "torch.hub.load", "pickle.loads", "__class__", "__globals__", "__builtins__", "__subclasses__", "__init__",
        "__reduce_ex__", "__dict__", "system", "self", "torch", "input", "getattr", "fx_pytree",
        f"__import__('os').system('{touch}')", f"open('{canary}', 'w')", f"x); open('{canary}', 'w'); (x",
        f"x\nimport os; os.system('{touch}')", f"eval(\"__import__('os').system('{touch}')\")",
        "<from original>os:system", "<from original>builtins:open", f"<from original>os:system('{touch}')",
        "fc1", "fc2.weight", "scale", "x", "mul", "linear", "getattr_1", "add", "output",
        "builtins.getattr", "operator.setitem", "operator.iadd", "torch.zeros", "F.linear", "mul_", "view",
    ]


def _values(strings):
    leaf = st.one_of(st.sampled_from(strings), st.integers(-(2**63), 2**63), st.floats(), st.booleans(), st.none(),
                     st.text(max_size=6))
    tags = ["node", "tuple", "dict", "slice", "dtype", "device", "float", "ellipsis", "memory_format", "layout"]
    return st.recursive(leaf, lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(tags + strings[:20]), inner, min_size=1, max_size=2)), max_leaves=6)


def _node(strings):
    """A node to insert: any op, a target from the payloads or the allow-lists, arguments that
    refer to existing nodes (getattr chains among them)."""
    targets = st.sampled_from(strings + sorted(_FUNCTIONS) + sorted(_METHODS))
    names = ["x", "fc1", "act", "fc2_weight", "scale", "mul", "add", "g0", "g1"]
    ref = st.sampled_from(names).map(lambda n: {"node": n})
    arg = st.one_of(ref, _values(strings))
    return st.fixed_dictionaries({
        "op": st.sampled_from(["call_function", "call_method", "call_module", "get_attr", "placeholder", "output"]),
        "name": st.sampled_from(["g0", "g1", "g2"] + strings),
        "target": targets,
        "args": st.lists(arg, max_size=3).map(lambda a: {"tuple": a}),
        "kwargs": st.dictionaries(st.sampled_from(["inplace", "out", "device", "dim"] + strings[:12]), arg,
                                  max_size=2).map(lambda k: {"dict": k}),
    })


def _getattr_chain(attributes):
    """builtins.getattr(builtins.getattr(x, a0), a1) ... : what an escape from a tensor looks like."""
    nodes, prev = [], "x"
    for i, name in enumerate(attributes):
        nodes.append({"op": "call_function", "name": f"g{i}", "target": "builtins.getattr",
                      "args": {"tuple": [{"node": prev}, name]}, "kwargs": {"dict": {}}})
        prev = f"g{i}"
    return nodes


def _mutate(data, recipe, strings):
    """One random edit somewhere in the recipe: replace, delete, duplicate or insert."""
    path, here = [], recipe
    while isinstance(here, (dict, list)) and here and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(here) if isinstance(here, dict) else range(len(here))))
        path.append(key)
        here = here[key]
    parent = recipe
    for key in path[:-1]:
        parent = parent[key]
    kind = data.draw(st.sampled_from(["replace", "delete", "duplicate", "insert", "chain"]))
    nodes = recipe.get("nodes") if isinstance(recipe.get("nodes"), list) else None
    if kind in ("insert", "chain") and nodes is not None:
        where = data.draw(st.integers(0, len(nodes)))
        new = [data.draw(_node(strings))] if kind == "insert" else \
            _getattr_chain(data.draw(st.lists(st.sampled_from(strings[13:30]), min_size=1, max_size=4)))
        nodes[where:where] = new
    elif path and kind == "delete":
        del parent[path[-1]]
    elif path and kind == "duplicate" and isinstance(parent, list):
        parent.insert(path[-1], json.loads(json.dumps(parent[path[-1]])))
    elif path:
        parent[path[-1]] = data.draw(_values(strings))


_COUNT = itertools.count()


@FUZZ
@given(data=st.data())
def test_mutated_recipes_load_or_are_refused_and_nothing_runs(seed, data):
    root, base, recipe, x = seed
    canary = root / "CANARY"
    strings = _payloads(canary)
    recipe = json.loads(json.dumps(recipe))
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate(data, recipe, strings)
    directory = root / f"case{next(_COUNT)}"
    directory.mkdir()
    shutil.copy(base / "weights.pt", directory / "weights.pt")
    (directory / "recipe.json").write_text(json.dumps(recipe))
    try:
        model = nepenthe.load(directory)
    except RecipeError as exc:  # --hypothesis-show-statistics: what refused how many
        event(f"refused: {str(exc).split(':')[0][:60]}")
        model = None
    if model is not None:  # allowed by every check: run its forward without memory or side effects
        event("loaded")
        try:
            with torch.device("meta"):
                model.to("meta")(x.to("meta"))
        except Exception:  # an allowed graph may still be wrong (shapes, types): not a concern here
            pass
    assert not canary.exists(), f"a payload ran: {json.dumps(recipe)[:2000]}"
    shutil.rmtree(directory)


_ANY = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(), st.text(max_size=8),
                 st.sampled_from(["cpu", "meta", "cuda:99", "mps", "/dev/null", "..", "/", "", "weights.pt"]),
                 st.just(torch.device("cpu")), st.just(nn.Linear(2, 2)), st.just(lambda: None),
                 st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_CLEAN = (NepentheError, TypeError, ValueError)


@FUZZ
@given(directory=_ANY, original=_ANY, map_location=_ANY, use_seed=st.booleans())
def test_load_arguments(seed, directory, original, map_location, use_seed):
    if use_seed:
        directory = seed[1]
    try:
        nepenthe.load(directory, original, map_location)
    except _CLEAN:
        pass


@FUZZ
@given(extra=st.one_of(_ANY, st.dictionaries(st.text(max_size=4), _ANY, max_size=3)), model=_ANY,
       original=_ANY, name=st.sampled_from(["out", "..", "", "weights.pt"]))
def test_save_arguments(seed, extra, model, original, name):
    root, base, _, _ = seed
    folded = nepenthe.load(base)
    for m in (model, folded):
        try:
            nepenthe.save(m, root / "saves" / name, extra, original=original)
        except (*_CLEAN, OSError):  # OSError: the folder is a file, e.g. (the filesystem's word)
            pass


@FUZZ
@given(cls=_ANY, to_kwargs=_ANY, build=_ANY)
def test_register_module_arguments(cls, to_kwargs, build):
    with pytest.raises(_CLEAN):
        register_module(cls, to_kwargs, build)


@FUZZ
@given(planner=_ANY, tolerance=_ANY, budget_s=_ANY, threads=_ANY)
def test_fold_options(seed, planner, tolerance, budget_s, threads):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    x = torch.randn(5, 3)
    stats = nepenthe.measure(model, [x])
    try:
        nepenthe.fold(model, stats, x, planner=planner, tolerance=tolerance, budget_s=budget_s, threads=threads)
    except _CLEAN:
        pass
