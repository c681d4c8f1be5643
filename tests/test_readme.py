"""The README's Python example runs as written (with shorter training so the suite stays fast)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    return blocks[0]


def test_readme_example_runs(tmp_path, monkeypatch):
    code = _python_block()
    short = code.replace("epochs=30", "epochs=4").replace("epochs=10", "epochs=1").replace("max_iters=8", "max_iters=2")
    assert short != code  # the substitutions above must still match the README
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(short, str(README), "exec"), namespace)
    folded, same = namespace["folded"], namespace["same"]
    x = namespace["data"].test.tensors[0][:8]
    assert (folded(x) - same(x)).abs().max() == 0
    assert (tmp_path / "ckpt" / "iter_000.pt").exists()
    assert len(code.strip().splitlines()) <= 15
