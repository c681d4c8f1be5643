"""Support tier: every error nepenthe raises, under one base class.

``except nepenthe.NepentheError`` catches them all. Each class also keeps the built-in base it had
before this module existed (``ValueError`` for bad input, ``RuntimeError`` for an operation that
cannot proceed), so existing ``except ValueError`` / ``except RuntimeError`` handlers still work.
Messages name the layer, tensor, file or key at fault and say what to do.
"""

from __future__ import annotations

__all__ = ["BackendUnavailable", "CheckpointError", "ConfigError", "DatasetError", "ExperimentError", "FoldError",
           "ForeignPruningError", "MeasureError", "NepentheError", "NonFiniteActivationError", "PruneError",
           "RecipeError", "TraceError"]


class NepentheError(Exception):
    """Base class of every error nepenthe raises."""


class BackendUnavailable(NepentheError, RuntimeError):
    """An explicitly requested backend cannot run this call (not built, wrong device or dtype)."""


class TraceError(NepentheError, RuntimeError):
    """The model cannot be captured by torch.fx symbolic tracing."""


class MeasureError(NepentheError, ValueError):
    """The model or data cannot be measured (no rectifier, no data, ...)."""


class NonFiniteActivationError(MeasureError):
    """A rectifier received NaN or Inf values."""


class PruneError(NepentheError, RuntimeError):
    """The loop cannot run as configured (nothing prunable, mismatched checkpoint, ...)."""


class CheckpointError(PruneError):
    """A checkpoint holds state a resume cannot use (malformed random states, generators that do not
    match this run); the message names the file, the key and what to do."""


class FoldError(NepentheError, RuntimeError):
    """Folding cannot proceed as asked (strict mode, mismatched statistics, ...)."""


class RecipeError(NepentheError, ValueError):
    """A recipe cannot be written or read (unsupported module / function, malformed or tampered file)."""


class ForeignPruningError(NepentheError, ValueError):
    """The model carries another library's pruning reparametrization that nepenthe would misread."""


class DatasetError(NepentheError, ValueError):
    """A dataset is missing, unreadable or malformed (the message names the file and says how to fix it)."""


class ConfigError(NepentheError, ValueError):
    """An experiment configuration is malformed; the message names the key."""


class ExperimentError(NepentheError, RuntimeError):
    """An experiment cannot run or resume as asked (the message says what to do)."""
