"""The CUDA backend compiles without a GPU: scripts/check_gpu_build.sh runs nvcc (sm_90) on every
csrc/cuda/*.cu and a host-compiler syntax check of the ATen glue csrc/cuda/ops_cuda.cpp.

Skipped where nvcc is absent (the script itself would only print SKIP). Running the kernels needs a GPU:
tests/test_backends.py covers that with the "cuda" backend.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_gpu_build.sh"


def _nvcc() -> str | None:
    """The nvcc the script would use (same search order)."""
    if os.environ.get("NVCC"):
        return shutil.which(os.environ["NVCC"])
    candidates = ["nvcc"]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    return next((found for c in candidates if (found := shutil.which(c))), None)


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (CUDA toolkit not installed)")
@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")
def test_cuda_sources_compile():
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"scripts/check_gpu_build.sh failed (exit {proc.returncode}):\n{output}"
    assert "check_gpu_build: all" in output, output
