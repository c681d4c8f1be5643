"""The CUDA backend compiles without a GPU: scripts/check_gpu_build.sh runs nvcc (sm_90) on every
csrc/cuda/*.cu and a host-compiler syntax check of the ATen glue csrc/cuda/ops_cuda.cpp.

The script runs once per test session, as the build step of the GPU suite's dry run (the shared fixture
``gpu_suite_dry_run`` of conftest.py; tests/ops/test_gpu_suite.py checks the rest of that run). Skipped where
nvcc is absent (the script itself would only print SKIP). Running the kernels needs a GPU:
tests/ops/test_backends.py covers that with the "cuda" backend, and bench/gpu_suite.sh on a GPU machine.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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
def test_cuda_sources_compile(gpu_suite_dry_run):
    proc, out, _ = gpu_suite_dry_run
    log = (out / "build.log").read_text()
    build = json.loads((out / "results.json").read_text())["steps"]["build"]
    assert build["status"] == "ok", f"scripts/check_gpu_build.sh failed:\n{log}\n{proc.stdout[-3000:]}"
    expected = len(list((ROOT / "csrc" / "cuda").glob("*.cu"))) + 1  # + the ATen glue ops_cuda.cpp
    assert f"check_gpu_build: all {expected} files compile" in log, log
    for cu in (ROOT / "csrc" / "cuda").glob("*.cu"):
        assert f"ok    csrc/cuda/{cu.name}" in log, log
