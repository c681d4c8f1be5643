"""nepenthe: entropy-based pruning that makes trained networks shallower (NEPENTHE, arXiv 2404.16890).

Measure how often each rectifier neuron is ON or OFF over a data set, prune weights where that
entropy is low until whole layers never change state, then delete those activations and fold
the neighbouring linear ops into one.

    stats  = nepenthe.measure(model, calib_loader)            # per-neuron sign histograms
    result = nepenthe.prune(model, calib_loader, retrain=..., evaluate=...)
    folded = nepenthe.fold(model, result.stats, example_batch)
    nepenthe.latency(folded, example_batch)
"""

__version__ = "0.1.0"

from . import ops  # noqa: E402  (layer 1 first: everything else builds on it)
from .entropy import EntropyStats, MeasureError, NonFiniteActivationError, StatsRecorder, measure  # noqa: E402
from .fold import ChannelAffine, FoldError, FoldReport, RecipeError, export_onnx, fold, load, save  # noqa: E402
from .graph import TraceError  # noqa: E402
from .latency import LatencyResult, compare_calls, compare_latency, latency  # noqa: E402
from .loop import IterationRecord, PruneConfig, PruneError, PruneResult, prune  # noqa: E402
from .ops import MaskedAdamW, MaskedSGD  # noqa: E402
from .train import TrainConfig, evaluate, train  # noqa: E402

__all__ = [
    "ChannelAffine", "EntropyStats", "FoldError", "FoldReport", "IterationRecord", "LatencyResult", "MaskedAdamW",
    "MaskedSGD", "MeasureError", "NonFiniteActivationError", "PruneConfig", "PruneError", "PruneResult", "RecipeError",
    "StatsRecorder", "TraceError", "TrainConfig", "__version__", "compare_calls", "compare_latency", "evaluate", "fold",
    "export_onnx", "latency", "load", "measure", "ops", "prune", "save", "train",
]
