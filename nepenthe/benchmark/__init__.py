"""Latency benchmark suite: the paper's models before and after folding (SPEC §5, issue 4).

Each :class:`Scenario` builds, without training and deterministically (seeded), a model in the
state pruning would leave it in: chosen rectifier call sites declared linear by forced statistics
(:func:`nepenthe.fold.preview.forced_stats`), optionally whole convolutions emptied
(:func:`~nepenthe.fold.preview.empty_layers`). :func:`run_suite` folds it at each batch size and
times the model against the folded one, eager and ``torch.compile``, timing blocks interleaved
(:func:`nepenthe.compare_latency`: ``torch.utils.benchmark`` with fixed threads on CPU, CUDA events on
GPU), and records median / IQR / min / max, FLOPs, parameters, the fold report and the environment.
:func:`write_results` writes ``bench.json`` (everything), ``bench.csv`` (one row per scenario ×
batch × mode) and ``bench.png`` (speed-up bars; needs matplotlib). ``nepenthe bench`` is the CLI.

    from nepenthe.benchmark import SCENARIOS, run_suite, write_results
    result = run_suite(["resnet18", "mlp_block"], batches=(1, 32), modes=("eager",), threads=2)
    write_results(result, "bench-out")
"""

from ..environment import environment
from .results import CSV_COLUMNS, check_targets, format_table, plot_speedups, write_results
from .scenarios import SCENARIOS, BuiltScenario, MLPBlock, Scenario, available_scenarios, fold_arguments, get_scenario
from .suite import DEFAULT_BATCHES, MODES, fold_scenario, main_bench, run_suite

__all__ = [
    "CSV_COLUMNS", "DEFAULT_BATCHES", "MODES", "SCENARIOS", "BuiltScenario", "MLPBlock", "Scenario",
    "available_scenarios", "check_targets", "environment", "fold_arguments", "fold_scenario", "format_table",
    "get_scenario", "main_bench", "plot_speedups", "run_suite", "write_results",
]
