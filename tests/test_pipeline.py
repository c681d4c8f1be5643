"""The main job end to end on a small budget, through the console script's entry point."""

import json

import pytest
import torch

from nepenthe import cli, load
from nepenthe.data import load_dataset

REQUIRED = {"dense_accuracy", "pruned_accuracy", "folded_accuracy", "rectifier_layers_total",
            "rectifier_layers_removed", "latency_ms_before", "latency_ms_after", "iterations", "environment"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = cli.main(["run", "--out", str(out), "--epochs", "12", "--retrain-epochs", "3", "--iters", "3",
                     "--latency-batch", "64", "--no-progress", "--threads", "1"])
    assert code == 0
    return out


def test_report_fields(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    assert REQUIRED <= set(report)
    assert report["rectifier_layers_total"] == 9
    its = report["iterations"]
    assert its[0]["iteration"] == 0 and its[0]["sparsity"] == 0.0
    assert all({"accuracy", "sparsity", "layer_entropy"} <= set(r) for r in its)
    assert [r["sparsity"] for r in its] == sorted(r["sparsity"] for r in its)
    assert report["environment"]["torch"] == torch.__version__
    # folding is exact on the calibration data, so held-out accuracy matches to within a sample
    assert abs(report["folded_accuracy"] - report["pruned_accuracy"]) <= 0.3
    assert report["fold"]["max_rel_error"] <= 1e-5


def test_outputs_written_and_folded_model_reloads(run_dir):
    assert (run_dir / "entropy.png").stat().st_size > 1000
    assert (run_dir / "checkpoints" / "iter_000.pt").exists()
    folded = load(run_dir / "folded")
    x = load_dataset("digits").test.tensors[0][:16]
    assert folded(x).shape == (16, 10)


def test_rerun_resumes_from_checkpoints(run_dir):
    before = json.loads((run_dir / "report.json").read_text())
    checkpoints = sorted((run_dir / "checkpoints").glob("iter_*.pt"))
    stamps = {p: p.stat().st_mtime_ns for p in checkpoints}
    code = cli.main(["run", "--out", str(run_dir), "--epochs", "12", "--retrain-epochs", "3", "--iters", "3",
                     "--latency-batch", "64", "--no-progress", "--threads", "1"])
    assert code == 0
    after = json.loads((run_dir / "report.json").read_text())
    # the loop was resumed from its checkpoints: none was rewritten, the same iterations come back
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == stamps
    assert [r["accuracy"] for r in after["iterations"]] == [r["accuracy"] for r in before["iterations"]]
    assert after["selected_iteration"] == before["selected_iteration"]


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    code = cli.main(["run", "--dataset", "fashion_mnist", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "error" in err and "dataset-fashion-mnist" in err and "Traceback" not in err


def test_run_on_an_image_dataset_with_augmentation(tmp_path, capsys):
    from tests.data.test_data_formats import write_cifar10

    write_cifar10(tmp_path / "data")
    out = tmp_path / "out"
    code = cli.main(["run", "--dataset", "cifar10", "--data-root", str(tmp_path / "data"), "--augment", "--model",
                     "cnn", "--epochs", "1", "--retrain-epochs", "1", "--iters", "1", "--latency-batch", "4",
                     "--planner", "none", "--no-progress", "--threads", "1", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["data_options"] == {"augment": True}
    assert report["fold"]["returned"] in ("folded", "folded_no_merges", "original") and "backoffs" in report
    assert "stop:" in capsys.readouterr().out


def test_cli_exit_status_1_for_a_failed_run(monkeypatch, tmp_path, capsys):
    """A run that fails (not a bad argument) exits 1 with one line, no traceback."""
    from nepenthe import pipeline
    from nepenthe.errors import FoldError

    def failing(cfg):
        raise FoldError("the fold went wrong here")

    monkeypatch.setattr(pipeline, "run", failing)
    assert cli.main(["run", "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err == "nepenthe run: failed: the fold went wrong here\n"


@pytest.mark.parametrize("argv, message", [
    (["--latency-batch", "0"], "--latency-batch must be >= 1, got 0"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--zeta", "1.5"], "--zeta must be in (0, 1], got 1.5"),
    (["--val-fraction", "1"], "--val-fraction must be in (0, 1)"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
    (["--out", __file__], "is a file; name a folder"),
    (["--out", "/proc/nepenthe-out"], "the folder cannot be created"),
])
def test_cli_run_flags_are_range_checked(argv, message, tmp_path, capsys):
    assert cli.main(["run", "--out", str(tmp_path / "o"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_ctrl_c_says_how_to_resume(monkeypatch, tmp_path, capsys):
    from nepenthe import pipeline

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run", interrupted)
    assert cli.main(["run", "--dataset", "fashion-mnist", "--out", str(tmp_path / "o"), "--no-progress"]) == 130
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err


def test_rerun_with_other_settings_is_refused_before_training(run_dir, capsys):
    """The run folder remembers what decided its result: --seed 1 (or another model, dataset, --iters)
    over it is refused in one line naming the change, before any training; --no-resume starts over."""
    fp = json.loads((run_dir / "run_config.json").read_text())
    assert fp["seed"] == 0 and fp["prune"]["max_iters"] == 3 and "out" not in fp and fp["nepenthe"]
    for extra, change in ((["--seed", "1"], "seed: 0 -> 1"), (["--iters", "4"], "prune.max_iters: 3 -> 4"),
                          (["--model", "plain_mlp"], "model: 'mlp' -> 'plain_mlp'")):
        argv = ["run", "--out", str(run_dir), "--epochs", "12", "--retrain-epochs", "3", "--iters", "3",
                "--latency-batch", "64", "--no-progress", "--threads", "1", *extra]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert change in err and "--no-resume" in err and err.count("\n") == 1
    assert json.loads((run_dir / "run_config.json").read_text()) == fp  # untouched by the refusals


def test_cli_pack_masks_stores_bits(tmp_path):
    out = tmp_path / "packed"
    assert cli.main(["run", "--out", str(out), "--epochs", "1", "--retrain-epochs", "1", "--iters", "1",
                     "--latency-batch", "8", "--no-progress", "--threads", "1",
                     "--pack-masks"]) == 0
    model = torch.load(out / "checkpoints" / "iter_001.pt", weights_only=True)["model"]
    masks = [k for k in model if "mask" in k]
    assert masks and all(k.endswith("_mask_bits") and model[k].dtype == torch.uint8 for k in masks)
