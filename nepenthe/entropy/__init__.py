"""Layer 2: per-neuron sign statistics of every rectifier, and the entropies derived from them.

``measure(model, data)`` runs the model over a calibration set with a probe at every rectifier call
site and returns :class:`EntropyStats`. Probes are placed on a torch.fx trace of the model, which
sees module and functional activations alike; an untraceable model falls back to forward
pre-hooks on activation modules (functional activations are then invisible, and a warning says
so). An FSDP2-sharded model (``fully_shard``), whose traced copy cannot run, runs its own forward:
activation modules through the same pre-hooks, and functional calls (``F.relu(x)``, ``x.relu()``,
inplace or not) through a ``TorchFunctionMode`` that names each call after the call site of a
structure-only trace (``functional.py``), so names and counts are the graph route's on the
unsharded model. :class:`StatsRecorder` uses the same pre-hooks on the live model, so statistics
can be gathered while it trains.

Pre-hooks see the activation's input before the module runs, so inplace activations are measured
correctly, and a call counter per forward pass tells apart several call sites of one module.
"""

from ..errors import MeasureError, NonFiniteActivationError
from .measure import StatsRecorder, describe_sites, measure
from .probes import clear_trace_cache
from .stats import ESTIMATORS, EntropyOptions, EntropyStats, SiteInfo

__all__ = ["ESTIMATORS", "EntropyOptions", "EntropyStats", "MeasureError", "NonFiniteActivationError", "SiteInfo",
           "StatsRecorder", "clear_trace_cache", "describe_sites", "measure"]
