"""Layer 4: folding zero-entropy rectifiers away (SPEC §4), and saving / loading the result."""

from .algebra import ChannelAffine
from .core import FoldError, FoldReport, count_flops, critical_path, fold
from .recipe import RecipeError, load, save

__all__ = ["ChannelAffine", "FoldError", "FoldReport", "RecipeError", "count_flops", "critical_path", "fold", "load", "save"]
