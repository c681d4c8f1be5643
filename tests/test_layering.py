"""The import graph follows DESIGN's layers: every module imports only its own layer, the layers
below it and the support tier; the support tier imports no layer; no module below the front door
imports the package root (``nepenthe/__init__.py``) for a name it defines; no file is over 450
lines. Checked on the source (every import statement, module level or inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nepenthe"
MAX_LINES = 450

# layer of each module (by dotted prefix; the longest prefix wins)
LAYERS = {
    "nepenthe._version": 0, "nepenthe.errors": 0, "nepenthe.environment": 0, "nepenthe._utils": 0,
    "nepenthe.activations": 0, "nepenthe.graph": 0, "nepenthe.masks": 0, "nepenthe.latency": 0,
    "nepenthe.checkpoint": 0, "nepenthe.progress": 0, "nepenthe.structure": 0, "nepenthe.models": 0,
    "nepenthe.testing": 0, "nepenthe.mask_interop": 0, "nepenthe.distributed": 0, "nepenthe.sharded": 0,
    "nepenthe.packed": 0,
    "nepenthe.ops": 1, "nepenthe.kernels": 1,
    "nepenthe.entropy": 2,
    "nepenthe.budget": 3, "nepenthe.loop": 3,
    "nepenthe.fold": 4,
    "nepenthe.benchmark": 5,
    "nepenthe.train": 6, "nepenthe.data": 6, "nepenthe.report": 6, "nepenthe.pipeline": 6, "nepenthe.cli": 6,
    "nepenthe.experiment": 6, "nepenthe.integrations": 6, "nepenthe": 6,
}
NAMES = {0: "support", 1: "ops", 2: "statistics", 3: "pruning", 4: "folding", 5: "benchmark", 6: "front ends"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement of the file."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("nepenthe")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("nepenthe"):
                out.append((target, [a.name for a in node.names], node.lineno))
    return out


MODULES = _modules()


def _targets(target: str, names: list[str]) -> list[str]:
    """`from pkg import sub` names a module pkg.sub when it is one; else the import is of pkg."""
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
    return subs if subs and len(subs) == len(names) else [target]


@pytest.mark.parametrize("module", [m for m in MODULES if m != "nepenthe"])
def test_imports_follow_the_layers(module):
    path, own = MODULES[module], _layer(module)
    bad = []
    for target, names, line in _imports(module, path):
        for t in _targets(target, names):
            if t == "nepenthe":
                bad.append(f"line {line}: imports {names} from the package root; import the defining module")
                continue
            layer = _layer(t)
            if own == 0 and layer != 0:
                bad.append(f"line {line}: support module imports {t} ({NAMES[layer]})")
            elif layer > own:
                bad.append(f"line {line}: {NAMES[own]} module imports {t} ({NAMES[layer]}), a layer above it")
    assert not bad, f"{module}:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", list(MODULES))
def test_no_file_over_the_line_limit(module):
    lines = MODULES[module].read_text().count("\n")
    where = MODULES[module].relative_to(ROOT)
    assert lines <= MAX_LINES, f"{where} has {lines} lines (> {MAX_LINES}): split it by concept"


def test_every_public_module_declares_all():
    missing = [m for m, p in MODULES.items()
               if not any(part.startswith("_") for part in m.split(".")[1:])
               and "__all__" not in p.read_text()]
    assert not missing, f"modules without __all__: {missing}"


def _declared_all(tree: ast.Module, module: str) -> set[str] | None:
    """The names of a module's ``__all__`` (literal items; a starred extension like ``*other.__all__``
    is skipped), or None without one."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            items = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else []
            return {e.value for e in items if isinstance(e, ast.Constant)}
    return None


def test_internals_carry_a_leading_underscore():
    """In a public module every top-level function and class is either exported (``__all__``) or
    marked internal by its name, so what a user may import is never a guess."""
    undeclared = []
    for module, path in MODULES.items():
        if any(part.startswith("_") for part in module.split(".")[1:]):
            continue
        tree = ast.parse(path.read_text())
        exported = _declared_all(tree, module)
        if exported is None:
            continue
        undeclared += [f"{module}.{node.name}" for node in tree.body
                       if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                       and not node.name.startswith("_") and node.name not in exported]
    assert not undeclared, f"public names missing from __all__ (export them or prefix them with _): {undeclared}"
