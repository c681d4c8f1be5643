"""The smallest experiment configuration a test can run through ``nepenthe experiment`` (as the TOML
file the command reads): digits, a 1-block MLP, one pruning iteration, no planner, one timing."""

from __future__ import annotations


def smallest_experiment_toml(name: str, seeds: list[int], methods: list[str], batch_size: int) -> str:
    quoted = ", ".join(f'"{m}"' for m in methods)
    return f"""
name = "{name}"
seeds = {seeds}
methods = [{quoted}]
[data]
dataset = "digits"
limit = 120
batch_size = {batch_size}
calib_batch_size = 60
calib_batches = 1
[model]
name = "mlp"
options = {{ width = 8, hidden = 8, depth = 1 }}
[dense]
epochs = 2
[retrain]
epochs = 1
[prune]
delta = 100.0
max_iters = 1
[fold]
planner = "none"
[latency]
batches = [2]
repeats = 1
warmup = 1
threads = 1
"""
