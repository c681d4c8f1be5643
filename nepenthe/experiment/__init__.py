"""Layer 6: paper-protocol experiments — every method from the same dense weights, over seeds.

    nepenthe experiment fashion-mlp --epochs-scale 0.5 --out runs/fashion-mlp

``load_config`` reads a TOML configuration (see :mod:`nepenthe.experiment.config` for the format,
``shipped_configs()`` for the ones that come with the package); ``run_experiment`` trains the dense
model once per seed, runs each method from it, folds, evaluates and times the result, and writes
``results.json`` / ``.csv`` / ``.md`` and plots. Everything is resumable.
"""

from .config import ConfigError, ExperimentConfig, from_dict, load_config, shipped_configs
from .runner import Experiment, ExperimentError, run_experiment

__all__ = ["ConfigError", "Experiment", "ExperimentConfig", "ExperimentError", "from_dict", "load_config",
           "run_experiment", "shipped_configs"]
