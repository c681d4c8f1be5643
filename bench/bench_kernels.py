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


@pytest.mark.parametrize("provider", ["nepenthe", "torch_unmasked", "torch+mask", "compile_unmasked"])
def test_masked_sgd_step(benchmark, provider):
    _run(benchmark, sgd_case(DEVICE), provider, "masked SGD step, ResNet-18 parameters")


@pytest.mark.parametrize("provider", ["nepenthe", "torch_unmasked", "torch+mask"])
def test_masked_adamw_step(benchmark, provider):
    _run(benchmark, adamw_case(DEVICE), provider, "masked AdamW step, ResNet-18 parameters")


@pytest.mark.parametrize("provider", ["nepenthe_measure", "torch_forward"])
def test_measure_resnet18(benchmark, provider):
    batch = 64 if not benchmark.disabled else 4
    _run(benchmark, measure_case(batch=batch, batches=2, device=DEVICE), provider, f"measure ResNet-18 batch {batch}")
