"""nepenthe: entropy-based pruning that makes trained networks shallower (NEPENTHE, arXiv 2404.16890).

Measure how often each rectifier neuron is ON or OFF over a data set, prune weights where that
entropy is low until whole layers never change state, then delete those activations and fold
the neighbouring linear ops into one.

    stats  = nepenthe.measure(model, calib_loader)            # per-neuron sign histograms
    result = nepenthe.prune(model, calib_loader, retrain=..., evaluate=...)
    folded = nepenthe.fold(model, result.stats, example_batch)
    nepenthe.latency(folded, example_batch)
"""

from . import ops
from ._version import __version__
from .distributed import RankError
from .entropy import EntropyStats, MeasureError, NonFiniteActivationError, StatsRecorder, measure
from .errors import NepentheError
from .fold import ChannelAffine, FoldError, FoldReport, RecipeError, export_onnx, fold, load, save
from .graph import TraceError
from .latency import LatencyResult, compare_calls, compare_latency, latency
from .loop import IterationRecord, PruneConfig, PruneError, PruneResult, PruningMethod, prune, prune_, prune_step
from .ops import MaskedAdamW, MaskedSGD
from .train import TrainConfig, evaluate, train

__all__ = [
    "ChannelAffine", "EntropyStats", "FoldError", "FoldReport", "IterationRecord", "LatencyResult", "MaskedAdamW",
    "MaskedSGD", "MeasureError", "NepentheError", "NonFiniteActivationError", "PruneConfig", "PruneError",
    "PruneResult", "PruningMethod", "RankError", "RecipeError", "StatsRecorder", "TraceError", "TrainConfig",
    "__version__", "compare_calls", "compare_latency", "evaluate", "export_onnx", "fold", "latency", "load",
    "measure", "ops", "prune", "prune_", "prune_step", "save", "train",
]
