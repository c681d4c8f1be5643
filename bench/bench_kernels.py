"""Fused ops vs plain PyTorch (pytest-benchmark; provider axis nepenthe / torch / torch.compile; size sweep).

    .venv/bin/python -m pytest bench/bench_kernels.py --benchmark-enable --benchmark-json=bench/kernels.json

In CI the suite runs with --benchmark-disable: each case once, as a smoke test of every provider, on
the small size only and without the torch.compile providers (compiling takes tens of seconds here).
The ratios in RESULTS.md come from ``compare_kernels.py``, which interleaves the providers.
"""

import pytest
import torch
from kernel_cases import activation_case, adamw_case, histogram_case, measure_case, sgd_case

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = {"small": (8, 16, 14, 14), "medium": (64, 64, 28, 28), "large": (256, 64, 56, 56)}


def _run(benchmark, case: dict, provider: str, group: str):
    if benchmark.disabled and provider.startswith("compile"):
        pytest.skip("torch.compile providers only run with --benchmark-enable")
    benchmark.group = group
    fn = case[provider]
    fn()  # warm-up (and compilation)
    benchmark(fn)


def _size(benchmark, size: str):
    if benchmark.disabled and size != "small":
        pytest.skip("smoke run: small size only")
    return SIZES[size]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _hist_shape(size, layout):
    n, c, h, w = SIZES[size]
    return (n * h * w, c) if layout == "2d" else (n, c, h, w)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d"])
@pytest.mark.parametrize("provider", ["nepenthe", "torch", "torch_2pass", "torch_sum", "compile"])
def test_sign_histogram(benchmark, size, dtype, layout, provider):
    _size(benchmark, size)
    case = histogram_case(_hist_shape(size, layout), DTYPES[dtype], channels_last=layout == "channels_last",
                          device=DEVICE)
    _run(benchmark, case, provider, f"sign_histogram {size} {dtype} {layout}")


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("provider", ["nepenthe", "torch_activation_only", "torch+histogram", "compile"])
def test_activation_histogram(benchmark, size, dtype, kind, provider):
    case = activation_case(kind, _size(benchmark, size), DTYPES[dtype], device=DEVICE)
    _run(benchmark, case, provider, f"activation+histogram {kind} {size} {dtype}")


OPTIM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET = "torch_fused_unmasked"  # torch's fastest step, SGD/AdamW(fused=True); the target


def _optim_variant(benchmark, provider: str, dtype: str, decay: str):
    """Smoke run: every provider on fp32 with weight decay, and bf16 without it for nepenthe and the
    fused target (each case builds the 11.2M ResNet-18 parameters, which takes a while)."""
    if benchmark.disabled and (dtype, decay) != ("fp32", "wd") and (
            (dtype, decay) != ("bf16", "no_wd") or provider not in ("nepenthe", TARGET)):
        pytest.skip("smoke run: fp32 + weight decay, and bf16 for nepenthe and torch_fused_unmasked")
    return OPTIM_DTYPES[dtype], decay == "wd"


@pytest.mark.parametrize("decay", ["wd", "no_wd"])
@pytest.mark.parametrize("dtype", list(OPTIM_DTYPES))
@pytest.mark.parametrize("provider", ["nepenthe", TARGET, "torch_unmasked", "torch+mask", "compile_unmasked"])
def test_masked_sgd_step(benchmark, provider, dtype, decay):
    dt, wd = _optim_variant(benchmark, provider, dtype, decay)
    _run(benchmark, sgd_case(DEVICE, dt, 5e-4 if wd else 0.0), provider,
         f"masked SGD step, ResNet-18 parameters, {dtype}, {decay}")


@pytest.mark.parametrize("decay", ["wd", "no_wd"])
@pytest.mark.parametrize("dtype", list(OPTIM_DTYPES))
@pytest.mark.parametrize("provider", ["nepenthe", TARGET, "torch_unmasked", "torch+mask"])
def test_masked_adamw_step(benchmark, provider, dtype, decay):
    dt, wd = _optim_variant(benchmark, provider, dtype, decay)
    _run(benchmark, adamw_case(DEVICE, dt, 1e-2 if wd else 0.0), provider,
         f"masked AdamW step, ResNet-18 parameters, {dtype}, {decay}")


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("provider", ["nepenthe_measure", "nepenthe_measure_cold", "torch_forward"])
def test_measure_resnet18(benchmark, batch, provider):
    if benchmark.disabled and batch != 1:
        pytest.skip("smoke run: batch 1 only")
    batches = 2 if batch == 64 else 8
    _run(benchmark, measure_case(batch=batch, batches=batches, device=DEVICE), provider,
         f"measure ResNet-18 batch {batch}")
