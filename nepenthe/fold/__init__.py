"""Layer 4: folding zero-entropy rectifiers away (docs/method.md §4), and saving / loading the result."""

from ..errors import RecipeError
from .core import fold
from .export import export_onnx
from .modules import ChannelAffine
from .registry import register_module
from .report import FoldError, FoldReport, count_flops, critical_path
from .saveload import load, save

__all__ = ["ChannelAffine", "FoldError", "FoldReport", "RecipeError", "count_flops", "critical_path", "export_onnx",
           "fold", "load", "register_module", "save"]
