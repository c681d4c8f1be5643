"""The experiment runner: TOML configurations, every method from the same dense weights, the
results table (mean ± std over seeds), plots, resume, and the ``nepenthe experiment`` command."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from nepenthe.cli import main
from nepenthe.experiment import ConfigError, ExperimentError, from_dict, load_config, run_experiment, shipped_configs
from nepenthe.experiment.results import markdown_table
from tests.experiment.smallest import smallest_experiment_toml

TINY = {
    "name": "tiny",
    "seeds": [0, 1],
    "methods": ["nepenthe", "imp"],
    "data": {"dataset": "digits", "limit": 160, "batch_size": 32, "calib_batch_size": 80, "calib_batches": 1},
    "model": {"name": "mlp", "options": {"width": 16, "hidden": 16, "depth": 2}},
    "dense": {"epochs": 2, "lr": 0.05},
    "retrain": {"epochs": 0.5},
    "prune": {"zeta": 0.5, "delta": None, "max_iters": 2, "normalize": "fan_in"},
    "fold": {"planner": "all"},
    "latency": {"batches": [1, 8], "repeats": 2, "warmup": 1, "threads": 1},
}


def tiny(**changes) -> dict:
    cfg = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    return cfg


# --------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------


def test_config_sections_become_the_library_configs():
    cfg = from_dict(tiny(prune={"zeta": 0.25, "delta": 1.5, "max_iters": 3, "methods": {"easier": {"max_iters": 9}}},
                         methods=["nepenthe", "easier"]))
    assert cfg.prune_config("nepenthe").zeta == 0.25 and cfg.prune_config("nepenthe").max_iters == 3
    assert cfg.prune_config("easier").max_iters == 9 and cfg.prune_config("easier").delta == 1.5
    assert cfg.retrain.lr == 0.05  # retraining inherits the dense recipe, except its epochs
    assert cfg.retrain.epochs == 0.5


def test_method_variants_run_a_method_with_their_own_settings():
    cfg = from_dict(tiny(methods=["nepenthe", "nepenthe-raw"],
                         prune={"normalize": "fan_in", "methods": {"nepenthe-raw": {"method": "nepenthe",
                                                                                     "normalize": "none"}}}))
    assert cfg.prune_config("nepenthe").normalize == "fan_in"
    raw = cfg.prune_config("nepenthe-raw")
    assert raw.method == "nepenthe" and raw.normalize == "none"


def test_epochs_scale_scales_every_duration():
    cfg = from_dict(tiny(dense={"epochs": 10, "schedule": "multistep", "milestones": [4, 8]}, epochs_scale=0.5))
    assert cfg.dense_recipe().epochs == 5 and cfg.dense_recipe().milestones == [2, 4]
    assert cfg.retrain_recipe().epochs == 0.25


@pytest.mark.parametrize("raw, message", [
    (tiny(colour="red"), r"unknown key\(s\) \['colour'\]"),
    (tiny(data__batchsize=3), r"unknown key\(s\) \['batchsize'\] in \[data\]"),
    (tiny(prune={"zeta": 0.5, "zetta": 1}), r"\['zetta'\] in \[prune\]"),
    (tiny(prune={"methods": {"magic": {}}}), r"prune\.methods\.magic"),
    (tiny(prune={"methods": {"raw": {"method": "snip"}}}), r"prune\.methods\.raw"),
    (tiny(methods=["nepenthe", "snip"]), "methods must be"),
    (tiny(seeds=[1, 1]), "seeds must be"),
    (tiny(prune={"zeta": 2.0}), r"\[prune\] for nepenthe: zeta must be in"),
    (tiny(latency__batches=[0]), "batches"),
    (tiny(dense={"epochs": -1}), r"\[dense\]: epochs must be"),
])
def test_bad_configurations_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_shipped_configurations_parse():
    shipped = shipped_configs()
    assert {"digits-mlp", "fashion-mlp", "fashion-cnn", "fashion-resnet18"} <= set(shipped)
    for name in shipped:
        cfg = load_config(name)
        assert cfg.seeds and cfg.methods


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no configuration file"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    torch.set_num_threads(1)
    results = run_experiment(from_dict(tiny()), out, progress=False, echo=lambda s: None)
    return out, results


def test_every_method_starts_from_the_same_dense_model(finished):
    _, results = finished
    runs = results["runs"]
    assert sorted((r["seed"], r["method"]) for r in runs) == [(0, "imp"), (0, "nepenthe"), (1, "imp"),
                                                               (1, "nepenthe")]
    for seed in (0, 1):
        mine = [r for r in runs if r["seed"] == seed]
        assert len({r["dense_test"] for r in mine}) == 1 and len({r["dense_val"] for r in mine}) == 1
        # the dense iteration of every method measured the same model on the same data
        assert len({json.dumps(r["iterations"][0]["layer_entropy"]) for r in mine}) == 1


def test_results_are_means_and_stds_of_the_runs(finished):
    _, results = finished
    for method in ("nepenthe", "imp"):
        mine = [r for r in results["runs"] if r["method"] == method]
        entry = results["summary"]["methods"][method]
        for key in ("folded_test", "removed", "sparsity", "prune_seconds"):
            values = [r[key] for r in mine]
            assert entry[key]["mean"] == pytest.approx(statistics.fmean(values))
            assert entry[key]["std"] == pytest.approx(statistics.stdev(values))
        for r in mine:
            assert r["removed"] == r["rectifiers_before"] - r["rectifiers_after"]
            assert set(r["latency"]) == {"1", "8"} and r["fold_seconds"] > 0
            assert r["delta_test"] == pytest.approx(r["folded_test"] - r["dense_test"])


def test_results_files(finished):
    out, results = finished
    for name in ("results.json", "results.csv", "results.md", "config.json", "accuracy_vs_removed.png",
                 "entropy.png", "seed0/dense.pt", "seed1/imp/result.json", "seed0/nepenthe/folded/recipe.json"):
        assert (out / name).exists(), name
    table = (out / "results.md").read_text()
    assert "| nepenthe |" in table and "| imp |" in table and "| dense |" in table and "±" in table
    csv_lines = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 4 and csv_lines[0].startswith("seed,method,")
    assert json.loads((out / "results.json").read_text())["summary"] == json.loads(json.dumps(results["summary"]))


def test_rerun_resumes_without_training(finished, monkeypatch):
    out, results = finished

    def no_training(*args, **kwargs):
        raise AssertionError("a finished experiment must not train again")

    monkeypatch.setattr("nepenthe.experiment.runner.train", no_training)
    again = run_experiment(from_dict(tiny()), out, progress=False, echo=lambda s: None)
    assert again["runs"] == json.loads(json.dumps(results["runs"]))
    assert again["seconds"] == pytest.approx(results["seconds"])  # the work done, not this quick rerun
    assert again["wall_seconds"] < results["seconds"]


def test_a_new_method_reuses_the_dense_models(finished, monkeypatch):
    out, _ = finished
    calls = []
    import nepenthe.experiment.runner as runner

    real = runner.train
    monkeypatch.setattr(runner, "train", lambda *a, **k: (calls.append(a[2].epochs), real(*a, **k))[1])
    results = run_experiment(from_dict(tiny(methods=["nepenthe", "imp", "egp"], seeds=[0])), out, progress=False,
                             echo=lambda s: None)
    assert {r["method"] for r in results["runs"]} == {"nepenthe", "imp", "egp"}
    assert calls and all(epochs == 0.5 for epochs in calls)  # retraining only: the dense model was read back


def test_another_configuration_in_the_same_folder_is_refused(finished):
    out, _ = finished
    with pytest.raises(ExperimentError, match=r"another configuration .*prune\.zeta: .* -> 0\.25"):
        run_experiment(from_dict(tiny(prune={"zeta": 0.25, "delta": None, "max_iters": 2})), out, progress=False,
                       echo=lambda s: None)


def test_markdown_table_formats_mean_and_std():
    results = {"name": "x", "summary": {
        "dense": {"test": {"mean": 90.0, "std": 0.5, "n": 2}, "rectifiers": 9, "critical_path": 35,
                  "latency_ms": {"1": {"mean": 3.0, "std": 0.0, "n": 2}}},
        "methods": {"nepenthe": {
            **{k: {"mean": 1.0, "std": 0.25, "n": 2} for k in ("folded_test", "delta_test", "sparsity", "removed",
                                                                  "zero_entropy_layers", "critical_path_after",
                                                                  "prune_seconds", "fold_seconds", "backoffs")},
            "latency_ms": {"1": {"mean": 1.5, "std": 0.05, "n": 2}},
            "speedup": {"1": {"mean": 2.0, "std": 0.1, "n": 2}}}}}}
    table = markdown_table(results)
    assert "| dense | 90.00 ± 0.50 |" in table
    assert "| nepenthe | 1.00 ± 0.25 | +1.00 ± 0.25 |" in table and "1.500 ± 0.050 | 2.00 ± 0.10 |" in table
    assert "| 3.000 ± 0.000 | 1.00 |" in table


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def test_cli_lists_and_runs(tmp_path, capsys):
    assert main(["experiment", "--list"]) == 0
    assert "fashion-mlp" in capsys.readouterr().out
    path = tmp_path / "tiny.toml"
    path.write_text(smallest_experiment_toml("cli", [0, 1], ["easier"], batch_size=40))
    out = tmp_path / "out"
    assert main(["experiment", str(path), "--out", str(out), "--seeds", "0", "--epochs-scale", "0.5",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| easier |" in printed and (out / "results.md").exists()
    saved = json.loads((out / "config.json").read_text())
    assert saved["seeds"] == [0] and saved["epochs_scale"] == 0.5


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["experiment", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert "no configuration file" in err and "Traceback" not in err
    assert main(["experiment", "digits-mlp", "--epochs-scale", "0"]) == 2
    assert "--epochs-scale must be > 0" in capsys.readouterr().err
