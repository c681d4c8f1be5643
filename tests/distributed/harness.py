"""Launch the gloo worker processes of the multi-process tests and compare what they saved.

:func:`launch` starts WORLD ranks of ``tests.distributed.worker`` (0: the one-process reference, no
group) on the scenarios of a module, bounded by a timeout: a hang fails the test with each rank's
last lines instead of blocking the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240  # one launch's whole scenario list; a hang (60 s group timeout per collective) fails the test


def launch(world: int, out: Path, module: str = "tests.distributed.worker", scenarios=None,
           timeout_s: float = TIMEOUT_S, **env_vars: str) -> dict[str, list[dict]]:
    """Run ``module``'s scenarios (all of ``SCENARIOS``, or those named) on ``world`` ranks; each
    scenario name -> the result every rank saved (``{"ok": ...}`` or ``{"error", "message"}``)."""
    import importlib

    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "NEPENTHE_SCENARIO_MODULE": module,
           **env_vars}
    if scenarios is None:
        scenarios = importlib.import_module(module).SCENARIOS
    else:
        env["NEPENTHE_SCENARIOS"] = ",".join(s.__name__ for s in scenarios)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.distributed.worker", str(r), str(world),
                               str(out / "rendezvous"), str(out)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(max(world, 1))]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout_s)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
        pytest.fail(f"{world} processes did not finish in {timeout_s} s (a hang); last lines:\n"
                    + "\n".join(log[-1500:] for log in logs))
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return {s.__name__: [torch.load(out / f"{s.__name__}.{r}.pt", weights_only=False) for r in range(max(world, 1))]
            for s in scenarios}


def ok(result: dict) -> object:
    """A scenario's value; its recorded error as the assertion message otherwise."""
    assert "ok" in result, f"{result.get('error')}: {result.get('message')}"
    return result["ok"]


def equal(a, b, where: str = "") -> None:
    """Bit-identical nested results (tensors by torch.equal, floats exactly)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
