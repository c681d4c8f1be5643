"""The docs site builds with warnings as errors, its tutorials run as written, and no docstring
cites a section the repository does not have."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _code(page: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)
    assert blocks, f"{page} has no python example"
    return "\n".join(blocks)


def _run(page: str, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_code(page), str(DOCS / page), "exec"), namespace)
    return namespace


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    api = (tmp_path / "site" / "reference" / "nepenthe" / "index.html").read_text()
    assert "Sign histograms and entropies" in api  # the docstrings made it into the reference


def test_tutorial_own_loop(tmp_path, monkeypatch):
    ns = _run("tutorials/own-loop.md", tmp_path, monkeypatch)
    result = ns["result"]
    assert len(result.iterations) == 3 and result.iterations[-1].sparsity > 0
    assert all(r.accuracy is None or r.accuracy > 1 for r in result.iterations)  # read as percent


def test_tutorial_huggingface(tmp_path, monkeypatch):
    from tests.test_untraceable_models import _transformers

    _transformers()
    ns = _run("tutorials/huggingface.md", tmp_path, monkeypatch)
    assert ns["report"].merges == ["encoder.layer.0.intermediate.dense + encoder.layer.0.output.dense"]


def test_tutorial_torchvision(torchvision_models, tmp_path, monkeypatch):
    ns = _run("tutorials/torchvision.md", tmp_path, monkeypatch)
    assert len(ns["stats"].histogram) == 17 and sum(ns["step"].pruned.values()) > 0


def test_docstrings_cite_sections_that_exist():
    sections = set(re.findall(r"^## (§\d+)", (DOCS / "method.md").read_text(), flags=re.M))
    cited = set()
    for path in (ROOT / "nepenthe").rglob("*.py"):
        text = path.read_text()
        assert "SPEC §" not in text, f"{path} cites SPEC, which is not in the repository"
        cited |= set(re.findall(r"docs/method\.md (§\d+)", text))
    assert cited and cited <= sections, cited - sections
