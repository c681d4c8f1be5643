"""The loop's configuration (:class:`PruneConfig`) and what it reports (:class:`IterationRecord`,
:class:`PruneResult`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch.nn as nn

from .. import budget
from ..entropy import EntropyStats
from .methods import METHODS as _METHOD_CLASSES
from .methods import PruningMethod, get_method

__all__ = ["METHODS", "SELECT_RULES", "IterationRecord", "PruneConfig", "PruneResult"]

METHODS = tuple(_METHOD_CLASSES)  # the built-in methods' names
SELECT_RULES = ("depth", "last")


@dataclass
class PruneConfig:
    """Options of the iterative loop (see the module docstring for the safety rules).

    ``normalize="fan_in"`` scales the budget's magnitude term by √fan-in (see
    :func:`nepenthe.budget.irrelevance`). ``select`` says which iteration within tolerance is
    returned (see :func:`select_iteration`). ``protect`` and ``layer_caps`` name modules by glob
    patterns over their qualified names; ``protect`` also takes ``"first"`` and ``"last"``.
    ``pack_masks=True`` stores the masks bit-packed (``*_mask_bits`` buffers and checkpoint keys);
    False keeps each layer's current form (bool for a new mask).
    """

    method: str | PruningMethod = "nepenthe"  # a name of METHODS, or a PruningMethod object
    zeta: float = 0.5
    max_iters: int = 9
    delta: float | None = 1.0  # back off / stop when accuracy < dense - delta (points); None: never
    temperature: float = 1.0
    zero_as: str | None = None  # None: the method's default
    aggregate: str | None = None
    estimator: str | None = None
    saturation: bool | None = None  # ReLU6 three-state (True) or two-state (False) entropy
    normalize: str = "fan_in"  # Fashion-MNIST: 8 vs 4 layers on the MLP, 0 vs 0.7 on ResNet-18 (bench/RESULTS.md)
    protect: tuple[str, ...] = ()
    layer_caps: dict[str, float] = field(default_factory=dict)
    cut_max_sparsity: float | None = 0.99
    max_backoffs: int = 3
    backoff_factor: float = 0.5
    select: str = "depth"
    checkpoint_dir: str | None = None
    resume: bool = True
    max_calib_batches: int | None = None
    filter_fn: Callable[[nn.Module, str], bool] | None = field(default=None, repr=False)
    # evaluate's value x is recorded as x * metric_scale percent; None: 100 when the dense model's
    # value is within [0, 1] (a fraction, said in a warning), else 1
    metric_scale: float | None = None
    # store the masks bit-packed on the model (``<param>_mask_bits``: 1/8 byte per weight instead of 1;
    # nepenthe.masks). Not part of identity(): the storage changes no result, so a run resumes either way
    pack_masks: bool = False

    def __post_init__(self):
        self.strategy = get_method(self.method)  # ValueError for an unknown name
        if not 0.0 < self.zeta <= 1.0:
            raise ValueError(f"zeta must be in (0, 1], got {self.zeta}")
        if self.max_iters < 0:
            raise ValueError(f"max_iters must be >= 0, got {self.max_iters}")
        if self.normalize not in budget.NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {budget.NORMALIZATIONS}, got {self.normalize!r}")
        if self.max_backoffs < 0:
            raise ValueError(f"max_backoffs must be >= 0, got {self.max_backoffs}")
        if not 0.0 < self.backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {self.backoff_factor}")
        if self.select not in SELECT_RULES:
            raise ValueError(f"select must be one of {SELECT_RULES}, got {self.select!r}")
        if self.cut_max_sparsity is not None and not 0.0 <= self.cut_max_sparsity < 1.0:
            raise ValueError(f"cut_max_sparsity must be in [0, 1) or None, got {self.cut_max_sparsity}")
        if self.metric_scale is not None and not (math.isfinite(self.metric_scale) and self.metric_scale > 0):
            raise ValueError(f"metric_scale must be a positive number (100 for fractions, 1 for percent), got "
                             f"{self.metric_scale}")
        if isinstance(self.protect, str):
            self.protect = (self.protect,)
        self.protect = tuple(self.protect)
        for pattern, cap in self.layer_caps.items():
            if not 0.0 <= float(cap) <= 1.0:
                raise ValueError(f"layer_caps[{pattern!r}] must be a sparsity in [0, 1], got {cap}")

    @property
    def method_name(self) -> str:
        return self.strategy.name

    def entropy_options(self) -> dict:
        """The method's measure options (docs/method.md §3 baselines), with the config's overrides."""
        opts = dict(self.strategy.entropy)
        for key in opts:
            if getattr(self, key) is not None:
                opts[key] = getattr(self, key)
        return opts

    def identity(self) -> dict:
        """The settings a checkpoint must match to be resumed."""
        return {"method": self.strategy.name, "zeta": self.zeta, "temperature": self.temperature,
                **self.entropy_options(),
                "normalize": self.normalize, "protect": list(self.protect), "layer_caps": dict(self.layer_caps),
                "cut_max_sparsity": self.cut_max_sparsity, "max_backoffs": self.max_backoffs,
                "backoff_factor": self.backoff_factor}


@dataclass
class IterationRecord:
    """What one iteration did and reached (iteration 0 is the dense model).

    ``zeta`` is the pruning fraction the kept step used (ζ times the back-off scale); ``backoffs``
    lists the failed attempts before it (their ζ, accuracy and why they failed); ``capped`` maps
    each layer whose share was limited by a cap to the weights the cap kept.
    """

    iteration: int
    accuracy: float | None  # None when the step diverged and nothing could be evaluated
    sparsity: float
    layer_sparsity: dict[str, float]
    layer_entropy: dict[str, float]
    zero_entropy_layers: list[str]
    pruned: dict[str, int]
    linearized: list[str]
    within_tolerance: bool
    seconds: float
    zeta: float = 0.0
    backoffs: list[dict] = field(default_factory=list)
    capped: dict[str, int] = field(default_factory=dict)
    failure: str | None = None  # why this iteration's last attempt failed (then within_tolerance is False)
    collapsed: int = 0  # rectifier layers linear on the data (zero entropy) or replaced by the identity (EASIER)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PruneResult:
    iterations: list[IterationRecord]
    selected: int  # the iteration whose model the loop returned
    stop_reason: str
    stats: EntropyStats  # statistics of the selected model on the calibration data

    @property
    def dense_accuracy(self) -> float:
        return self.iterations[0].accuracy

    @property
    def selected_record(self) -> IterationRecord:
        return self.iterations[self.selected]

    @property
    def backoffs(self) -> int:
        """Failed attempts over the whole run (each cost one retraining)."""
        return sum(len(r.backoffs) for r in self.iterations)
