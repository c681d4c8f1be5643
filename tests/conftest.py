import os
import sys

import pytest
import torch
from hypothesis import settings

# Triton kernels run here (no GPU) only through the interpreter, and the flag must be set before any
# kernel is defined, i.e. before nepenthe.kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Property tests draw the same examples on every run, so a red CI always means a change, never a
# new random draw. `HYPOTHESIS_PROFILE=explore pytest ...` searches fresh examples (and keeps a
# database of failures) when hunting for bugs.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny ops: on a shared 2-core machine a 2-thread OpenMP
    region waits for a time slice whenever another process holds a core (~10× slower tests)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def torchvision_models():
    """``torchvision.models``, or skip when torchvision is not installed (see import_torchvision_models)."""
    models = import_torchvision_models()
    if models is None:
        pytest.skip("torchvision is not installed")
    return models


def import_torchvision_models():
    """``torchvision.models``, or None when torchvision is not installed.

    PyPI's torchvision wheel ships C++ ops (nms, roi_align, ...) built against the CUDA build of
    torch; on the CPU build (CI) registering their fake kernels fails during ``import torchvision``.
    Its model definitions are pure Python and use none of those ops, so the import is retried with
    those registrations skipped: the models under test are then torchvision's own, unmodified.
    (Hugging Face transformers imports torchvision too: tests of it call this first.)
    """
    try:
        import torchvision.models as models
        return models
    except ModuleNotFoundError:
        return None
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    register_fake = torch.library.register_fake

    def skip_torchvision_ops(op, *args, **kwargs):
        if isinstance(op, str) and op.startswith("torchvision::"):
            return (lambda fn: fn) if not args else None
        return register_fake(op, *args, **kwargs)

    torch.library.register_fake = skip_torchvision_ops
    try:
        import torchvision.models as models
    finally:
        torch.library.register_fake = register_fake
    return models


@pytest.fixture(scope="session")
def gpu_suite_dry_run(tmp_path_factory):
    """``bench/gpu_suite.sh OUT --dry-run`` once per session: tests/ops/test_gpu_suite.py checks its files, and
    tests/ops/test_gpu_build.py its build step (scripts/check_gpu_build.sh: nvcc sm_90 of every .cu), so that the
    CUDA sources compile once per test run. Returns (completed process, OUT_DIR, seconds)."""
    import subprocess
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("gpu_suite_out")
    env = dict(os.environ, PYTHON=sys.executable)
    start = time.monotonic()
    proc = subprocess.run(["bash", str(root / "bench" / "gpu_suite.sh"), str(out), "--dry-run"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    return proc, out, time.monotonic() - start
