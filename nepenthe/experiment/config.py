"""Experiment configurations: a TOML file (or dict) -> validated :class:`ExperimentConfig`.

A configuration names everything an experiment needs, so that its results can be reproduced from
the file alone::

    name = "fashion-mlp"
    seeds = [0, 1, 2]
    methods = ["nepenthe", "imp", "egp", "easier"]

    [data]                  # nepenthe.data.load_dataset, plus loader sizes
    dataset = "fashion_mnist"
    batch_size = 128
    calib_batches = 10      # Ξ: the first batches of the (unshuffled) training split

    [model]                 # nepenthe.models.build_model
    name = "mlp"
    options = { width = 128 }

    [dense]                 # nepenthe.TrainConfig of the dense training
    epochs = 10
    lr = 0.05

    [retrain]               # nepenthe.TrainConfig of each iteration's retraining
    epochs = 2

    [prune]                 # nepenthe.PruneConfig (all methods)
    zeta = 0.5
    delta = 1.0

    [prune.methods.easier]  # overrides for one method
    max_iters = 9

    [prune.methods.nepenthe-raw]  # a variant: a name of your own, the method it runs, its overrides
    method = "nepenthe"
    normalize = "none"

    [fold]                  # nepenthe.fold options
    planner = "latency"

    [latency]               # before/after timing (and the batch the planner times at)
    batches = [1, 256]

Unknown keys are errors that name the key and the section, so a typo never silently becomes a
default.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..loop import METHODS, PruneConfig
from ..train import TrainConfig

__all__ = ["SHIPPED_DIR", "DataSection", "ExperimentConfig", "FoldSection", "from_dict", "LatencySection",
           "load_config", "ModelSection", "shipped_configs"]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib



#: Configurations shipped with the package (``nepenthe experiment fashion-mlp``).
SHIPPED_DIR = Path(__file__).parent / "configs"


@dataclass
class DataSection:
    dataset: str = "digits"
    root: str | None = None
    val_fraction: float = 0.1
    split_seed: int = 0  # the same train/val/test split for every seed
    limit: int | None = None
    batch_size: int = 128
    calib_batch_size: int = 512
    calib_batches: int | None = None  # None: the whole training split
    eval_batch_size: int = 1000
    options: dict = field(default_factory=dict)  # extra load_dataset arguments (augment, image_size, ...)


@dataclass
class ModelSection:
    name: str = "mlp"
    options: dict = field(default_factory=dict)  # constructor arguments (width, depth, ...)


@dataclass
class FoldSection:
    planner: str = "latency"
    approximate: bool = False


@dataclass
class LatencySection:
    batches: list[int] = field(default_factory=lambda: [1, 256])  # the planner times at the first
    repeats: int = 20
    warmup: int = 3
    threads: int | None = None
    device: str = "auto"


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    dense: TrainConfig = field(default_factory=TrainConfig)
    retrain: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2))
    prune: dict = field(default_factory=dict)  # PruneConfig fields shared by all methods
    method_overrides: dict[str, dict] = field(default_factory=dict)
    fold: FoldSection = field(default_factory=FoldSection)
    latency: LatencySection = field(default_factory=LatencySection)
    epochs_scale: float = 1.0

    def prune_config(self, method: str, checkpoint_dir: str | None = None) -> PruneConfig:
        """The PruneConfig of one method (or variant): shared settings, then its overrides."""
        # the runner's evaluate gives percent (an untrained model may score within [0, 1])
        fields = {"metric_scale": 1.0, **self.prune, "method": method, **self.method_overrides.get(method, {})}
        try:
            return PruneConfig(**fields, checkpoint_dir=checkpoint_dir)
        except TypeError as exc:
            raise ConfigError(f"[prune] for {method}: {exc}") from None

    def dense_recipe(self) -> TrainConfig:
        return self.dense.scaled(self.epochs_scale)

    def retrain_recipe(self) -> TrainConfig:
        return self.retrain.scaled(self.epochs_scale)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _section(cls, values, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"[{where}] must be a table, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{where}]; known: {sorted(known)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{where}]: {exc}") from None


# PruneConfig fields that take None, which TOML cannot write: `false` or "none" stand for it
_NULLABLE = ("delta", "cut_max_sparsity", "max_calib_batches")


def _prune_fields(values: dict, where: str) -> dict:
    known = {f.name for f in dataclasses.fields(PruneConfig)} - {"method", "checkpoint_dir", "filter_fn"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{where}]; known: {sorted(known)}")
    return {k: (None if k in _NULLABLE and (v is False or v == "none") else v) for k, v in values.items()}


def from_dict(raw: dict) -> ExperimentConfig:
    """Validate a parsed TOML document (or an equivalent dict)."""
    raw = dict(raw)
    sections = {"data", "model", "dense", "retrain", "prune", "fold", "latency"}
    top = {"name", "seeds", "methods", "epochs_scale"}
    unknown = sorted(set(raw) - sections - top)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}; known: {sorted(top | sections)}")
    cfg = ExperimentConfig()
    cfg.name = str(raw.get("name", cfg.name))
    cfg.seeds = [int(s) for s in raw.get("seeds", cfg.seeds)]
    cfg.methods = list(raw.get("methods", cfg.methods))
    cfg.epochs_scale = float(raw.get("epochs_scale", 1.0))
    prune = dict(raw.get("prune", {}))
    overrides = prune.pop("methods", {})
    bad = [m for m in cfg.methods if m not in METHODS and m not in overrides]
    if bad or not cfg.methods or len(set(cfg.methods)) != len(cfg.methods):
        raise ConfigError(f"methods must be a non-empty list of distinct names from {list(METHODS)} or variants "
                          f"defined in [prune.methods.<name>], got {cfg.methods}")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seeds must be a non-empty list of distinct integers, got {cfg.seeds}")
    if "data" in raw:
        cfg.data = _section(DataSection, raw["data"], "data")
    if "model" in raw:
        cfg.model = _section(ModelSection, raw["model"], "model")
    if "dense" in raw:
        cfg.dense = _section(TrainConfig, raw["dense"], "dense")
    # retraining defaults to the dense recipe with its own epochs
    retrain = {**{k: v for k, v in dataclasses.asdict(cfg.dense).items() if k != "epochs"}, "epochs": 2,
               **raw.get("retrain", {})}
    cfg.retrain = _section(TrainConfig, retrain, "retrain")
    cfg.prune = _prune_fields(prune, "prune")
    for name, values in overrides.items():
        if not isinstance(values, dict):
            raise ConfigError(f"[prune.methods.{name}] must be a table")
        base = values.get("method", name)
        if base not in METHODS:
            raise ConfigError(f"[prune.methods.{name}]: {name!r} is not a method; a variant says which it runs "
                              f"(method = one of {list(METHODS)})")
        cfg.method_overrides[name] = {**_prune_fields({k: v for k, v in values.items() if k != "method"},
                                                      f"prune.methods.{name}"), "method": base}
    if "fold" in raw:
        cfg.fold = _section(FoldSection, raw["fold"], "fold")
    if "latency" in raw:
        cfg.latency = _section(LatencySection, raw["latency"], "latency")
    if not cfg.latency.batches or any(int(b) < 1 for b in cfg.latency.batches):
        raise ConfigError(f"[latency] batches must be a non-empty list of sizes >= 1, got {cfg.latency.batches}")
    for method in cfg.methods:  # every method's PruneConfig must build (it validates its values)
        try:
            cfg.prune_config(method)
        except ValueError as exc:
            raise ConfigError(f"[prune] for {method}: {exc}") from None
    return cfg


def shipped_configs() -> dict[str, Path]:
    """Name -> path of the configurations that come with the package."""
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.toml"))}


def load_config(path_or_name: str | Path) -> ExperimentConfig:
    """Read a TOML configuration from a path, or a shipped one by name (see :func:`shipped_configs`)."""
    path = Path(path_or_name)
    if not path.exists():
        shipped = shipped_configs()
        if str(path_or_name) in shipped:
            path = shipped[str(path_or_name)]
        else:
            raise ConfigError(f"no configuration file {str(path_or_name)!r}; give a path to a .toml file or one of "
                              f"the shipped configurations: {', '.join(shipped) or '(none)'}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    try:
        return from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
