"""Latency before / after folding, measured in one run (pytest-benchmark; provider axis).

A deep residual MLP whose blocks were emptied by pruning (fc1 weights all zero, as NEPENTHE leaves
them) is folded; both models run on the same batch. Run:

    .venv/bin/python -m pytest bench/bench_fold_latency.py --benchmark-enable --benchmark-json=bench/fold.json

In CI the suite runs with --benchmark-disable (each case once, as a smoke test).
"""

import pytest
import torch

import nepenthe
from nepenthe.models import ResidualMLP


def collapsed_mlp(collapsed_blocks: int, depth: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ResidualMLP(64, 10, width=128, hidden=256, depth=depth).eval()
    with torch.no_grad():
        for block in list(model.blocks)[:collapsed_blocks]:
            block.fc1.weight.zero_()
    return model


@pytest.fixture(scope="module", params=[0, 4, 8], ids=lambda k: f"collapsed{k}")
def models(request):
    model = collapsed_mlp(request.param)
    calib = torch.randn(512, 1, 8, 8)
    stats = nepenthe.measure(model, [calib])
    folded = nepenthe.fold(model, stats, calib)
    assert folded.fold_report.max_rel_error <= 1e-5
    return model, folded


@pytest.mark.parametrize("batch", [1, 256])
@pytest.mark.parametrize("provider", ["pruned", "folded"])
def test_fold_latency(benchmark, models, provider, batch):
    model = models[0] if provider == "pruned" else models[1]
    x = torch.randn(batch, 1, 8, 8)
    benchmark.group = f"{benchmark.name.split('[')[0]} batch={batch}"
    with torch.no_grad():
        benchmark(model, x)
