"""Latency benchmark suite: the paper's models before and after folding (docs/method.md §5, issue 4).

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

Provider comparisons (a fused op against PyTorch's fastest way, timed in one run) go through
:func:`compare_providers` and are written in the one measurement schema, :data:`MEASUREMENT_COLUMNS`
(the ``bench/`` scripts, the GPU suite and ``measurements.csv`` here).
"""

from ..environment import environment
from .compare import (
    MEASUREMENT_COLUMNS,
    compare_providers,
    markdown_table,
    read_measurements,
    rows_from_results,
    write_measurements,
)
from .results import CSV_COLUMNS, check_targets, format_table, plot_speedups, write_results
from .scenarios import SCENARIOS, BuiltScenario, MLPBlock, Scenario, available_scenarios, fold_arguments, get_scenario
from .suite import DEFAULT_BATCHES, MODES, fold_scenario, main_bench, run_suite

__all__ = [
    "CSV_COLUMNS", "DEFAULT_BATCHES", "MEASUREMENT_COLUMNS", "MODES", "SCENARIOS", "BuiltScenario", "MLPBlock",
    "Scenario", "available_scenarios", "check_targets", "compare_providers", "environment", "fold_arguments",
    "fold_scenario", "format_table", "get_scenario", "main_bench", "markdown_table", "plot_speedups",
    "read_measurements", "rows_from_results", "run_suite", "write_measurements", "write_results",
]
