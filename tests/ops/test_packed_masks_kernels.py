"""The GPU backends read bit-packed masks themselves (bit i % 8 of byte i // 8, least significant first):
the Triton kernels (through the interpreter here, on their interpreter plans and forced onto their GPU
plans), the CUDA kernels (their per-block code run on the CPU by a host harness built with nvcc, and the
real kernels on a GPU when there is one). Each step with packed masks must be bit-identical to the same
step with bool masks. The public ops with packed masks on every backend: test_backends.py."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from nepenthe import ops
from nepenthe.ops import backends
from tests.ops.test_backends import loaded_backend

HARNESS = Path(__file__).with_name("masked_optim_host_check.cu")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype, torch.int16))


def _step_both_ways(impl, device, dtype, shapes, seed=0):
    """SGD then AdamW through the backend function, once with bool masks and once with packed ones;
    returns (bool-mask tensors, packed-mask tensors, the bool masks)."""
    g = torch.Generator().manual_seed(seed)
    make = lambda positive=False: [(torch.rand(s, generator=g) if positive else torch.randn(s, generator=g))
                                   .to(dtype=dtype, device=device) for s in shapes]
    params, grads, bufs, m, v, vmax = make(), make(), make(), make(), make(True), make(True)
    keep = [(torch.rand(s, generator=g) > 0.4).to(device) for s in shapes]
    keep[1] = None  # an unmasked tensor among masked ones
    runs = []
    for masks in (keep, [None if k is None else ops.pack_mask(k) for k in keep]):
        state = [[t.clone() for t in ts] for ts in (params, bufs, m, v, vmax)]
        impl.masked_sgd_(state[0], grads, state[1], masks, 0.1, 0.9, 0.0, 1e-2, True, False, False)
        impl.masked_adamw_(state[0], grads, state[2], state[3], state[4], masks, 1e-2, 0.9, 0.999, 1e-8, 1e-2, 3,
                           True, False)
        runs.append(state)
    return runs[0], runs[1], keep


def _assert_identical(bool_run, packed_run, keep):
    for a_list, b_list in zip(bool_run, packed_run):
        for a, b, k in zip(a_list, b_list, keep):
            assert torch.equal(_bits(a.cpu()), _bits(b.cpu()))
            if k is not None:  # exactly +0.0 where masked
                assert not bool(_bits(b.cpu())[~k.cpu()].any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_triton_reads_packed_bits_like_bool_masks(dtype):
    impl, device = loaded_backend("triton")
    # several chunks of the interpreter plan (BLOCK = CHUNK = 64 here), a tail, odd sizes, one element
    shapes = [(100,), (37,), (3, 5, 7), (1,), (64,), (9,)]
    _assert_identical(*_step_both_ways(impl, device, dtype, shapes))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_packed_bits_on_the_gpu_plan(monkeypatch, dtype):
    """Chunks of 256 elements in blocks of 64, as on the GPU: a chunk's mask starts at byte 32 k."""
    impl, device = loaded_backend("triton")
    mo = importlib.import_module(impl.__name__ + ".masked_optim")
    monkeypatch.setattr(mo, "_block_and_chunk", lambda numels, device: (64, 256, 4))
    mo.clear_cache()
    try:
        _assert_identical(*_step_both_ways(impl, device, dtype, [(300,), (513,), (16, 16), (1,), (0,), (777,)]))
    finally:
        mo.clear_cache()


def test_triton_refuses_a_packed_mask_of_the_wrong_length():
    impl, device = loaded_backend("triton")
    p, g = torch.zeros(20, device=device), torch.zeros(20, device=device)
    with pytest.raises(ValueError, match=r"packed mask of a parameter of 20 elements must be a contiguous uint8\[3\]"):
        impl.masked_sgd_([p], [g], [], [torch.zeros(2, dtype=torch.uint8, device=device)], 0.1, 0.0, 0.0, 0.0,
                         False, False, False)


def test_gpu_backends_take_packed_masks_without_unpacking(monkeypatch):
    """The op layer hands packed masks to the cuda and triton backends as they are (their TABLE rows)."""
    assert backends.TABLE["cuda"].packed_masks and backends.TABLE["triton"].packed_masks
    impl, device = loaded_backend("triton")
    seen = []
    real = impl.masked_sgd_
    monkeypatch.setattr(impl, "masked_sgd_", lambda *a: (seen.extend(m.dtype for m in a[3]), real(*a)))
    p, g = torch.randn(40, device=device), torch.randn(40, device=device)
    keep = torch.arange(40, device=device) % 3 != 0
    with backends.use_backend("triton"):
        ops.masked_sgd_([p], [g], [], [ops.pack_mask(keep)], lr=0.1)
    assert seen == [torch.uint8] and not bool(p[~keep].any())


def _nvcc() -> str | None:
    for candidate in (os.environ.get("NVCC"), "nvcc", os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"),
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (CUDA toolkit not installed)")
def test_cuda_kernel_code_reads_packed_bits_like_bool_masks(tmp_path):
    """sgd_block / adamw_block of csrc/cuda/masked_optim_cuda.cu, run on the CPU over every block and
    thread: fp32 / fp64 / fp16 / bf16, two whole 65536-element chunks and a vector tail, a tail-only
    tensor and an unaligned one (the element-by-element path)."""
    exe = tmp_path / "masked_optim_host_check"
    build = subprocess.run([_nvcc(), "-O2", "-std=c++17", "-o", str(exe), str(HARNESS)], capture_output=True,
                           text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_cuda_reads_packed_bits_like_bool_masks(dtype):
    impl, device = loaded_backend("cuda")
    shapes = [(2 * 65536 + 37,), (45,), (3, 5, 7), (1,), (4096,), (1031,)]
    _assert_identical(*_step_both_ways(impl, device, dtype, shapes))
    with pytest.raises(RuntimeError, match=r"a packed mask of params\[0\] \(20 elements\) must be 1-d with 3 bytes"):
        p = torch.zeros(20, device=device)
        impl.masked_sgd_([p], [p.clone()], [], [torch.zeros(2, dtype=torch.uint8, device=device)], 0.1, 0.0, 0.0,
                         0.0, False, False, False)
