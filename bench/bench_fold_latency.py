"""Latency before / after folding of the benchmark scenarios (pytest-benchmark; provider axis).

The scenarios of ``nepenthe.benchmark`` (CIFAR ResNet-18 with emptied blocks, MobileNetV2 and
VGG-16-bn with linear rectifiers, a transformer MLP block with a linear GELU), built without
training, folded at each batch size, timed as ``before`` (the model) and ``after`` (fold's result).
Run:

    .venv/bin/python -m pytest bench/bench_fold_latency.py --benchmark-enable --benchmark-json=bench/fold.json

In CI the suite runs with --benchmark-disable (each case once, as a smoke test); folding then uses
planner="all" (no timing inside fold) to stay fast. With the benchmark enabled fold uses each
scenario's own settings (its latency planner). pytest-benchmark times one case after another; for
interleaved before/after timing, the batch sweep and torch.compile use ``nepenthe bench``
(``nepenthe/benchmark.py``), whose numbers are in RESULTS.md.

``collapsed_mlp`` (the residual MLP with emptied blocks) is kept for ``bench/compare_fold.py``.
"""

import pytest
import torch

import nepenthe
from nepenthe import benchmark as nb
from nepenthe.models import ResidualMLP

BATCHES = (1, 32)


def collapsed_mlp(collapsed_blocks: int, depth: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ResidualMLP(64, 10, width=128, hidden=256, depth=depth).eval()
    with torch.no_grad():
        for block in list(model.blocks)[:collapsed_blocks]:
            block.fc1.weight.zero_()
    return model


_built: dict = {}  # per scenario: (scenario, model, stats); per scenario + '/smoke': its folded model


def _model_and_stats(name: str):
    if name not in _built:
        scenario = nb.get_scenario(name)
        model = scenario.model()
        _built[name] = (scenario, model, scenario.stats(model))
    return _built[name]


@pytest.fixture(scope="module", params=[(s, b) for s in nb.SCENARIOS for b in BATCHES],
                ids=lambda p: f"{p[0]}-batch{p[1]}")
def scenario_models(request):
    name, batch = request.param
    scenario, model, stats = _model_and_stats(name)
    x = scenario.example_input(batch)
    if request.config.getoption("benchmark_disable", default=False):
        # smoke run: every exact merge, independent of the batch, so fold once per scenario
        if "folded" not in _built.get(name + "/smoke", {}):
            kwargs = nb.fold_arguments({**scenario.fold_kwargs, "planner": "all"})
            _built[name + "/smoke"] = {"folded": nb.fold_scenario(nb.BuiltScenario(model, stats, x, kwargs))[0]}
        folded = _built[name + "/smoke"]["folded"]
    else:  # the latency planner decides on this batch
        folded, _ = nb.fold_scenario(nb.BuiltScenario(model, stats, x, nb.fold_arguments(dict(scenario.fold_kwargs))))
    assert folded.fold_report.rectifier_layers_removed == scenario.expected_removed
    return model, folded, x, f"{name} batch={batch}"


@pytest.mark.parametrize("provider", ["before", "after"])
def test_scenario_latency(benchmark, scenario_models, provider):
    model, folded, x, group = scenario_models
    benchmark.group = group
    with torch.no_grad():
        benchmark(model if provider == "before" else folded, x)


@pytest.fixture(scope="module", params=[0, 4, 8], ids=lambda k: f"collapsed{k}")
def collapsed_models(request):
    model = collapsed_mlp(request.param)
    calib = torch.randn(512, 1, 8, 8)
    stats = nepenthe.measure(model, [calib])
    folded = nepenthe.fold(model, stats, calib, **nb.fold_arguments({"planner": "all"}))
    assert folded.fold_report.max_rel_error <= 1e-5
    return model, folded


@pytest.mark.parametrize("batch", [1, 256])
@pytest.mark.parametrize("provider", ["pruned", "folded"])
def test_fold_latency(benchmark, collapsed_models, provider, batch):
    model = collapsed_models[0] if provider == "pruned" else collapsed_models[1]
    x = torch.randn(batch, 1, 8, 8)
    benchmark.group = f"{benchmark.name.split('[')[0]} batch={batch}"
    with torch.no_grad():
        benchmark(model, x)
