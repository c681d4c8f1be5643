"""Layer 4: folding zero-entropy rectifiers away (SPEC §4), and saving / loading the result."""

from .algebra import ChannelAffine
from .core import fold
from .export import export_onnx
from .recipe import RecipeError, load, register_module, save
from .report import FoldError, FoldReport, count_flops, critical_path

__all__ = ["ChannelAffine", "FoldError", "FoldReport", "RecipeError", "count_flops", "critical_path", "export_onnx",
           "fold", "load", "register_module", "save"]
