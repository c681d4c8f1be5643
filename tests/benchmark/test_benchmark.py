"""The latency benchmark suite (nepenthe.benchmark, ``nepenthe bench``): scenarios, run_suite, outputs, CLI.

No timed assertions: only what was measured, how it is reported, and that the scenarios fold exactly.
Folding here uses planner="all" where fold has a planner (every exact merge, no timing), so that the
tests are fast and the result is compared with the linearized reference.
"""

import csv
import json
import sys

import pytest
import torch

from nepenthe import benchmark as nb
from nepenthe.benchmark.suite import _rel_error
from nepenthe.cli import main
from nepenthe.fold import count_flops
from nepenthe.fold.preview import linearized
from nepenthe.latency import CudaEventTimer, _timer

EXACT = {"planner": "all"}  # dropped by fold_arguments when fold has no planner


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny batches (tests/conftest.py)


@pytest.mark.parametrize("name", list(nb.SCENARIOS))
def test_scenario_folds_exactly(name):
    scenario = nb.get_scenario(name)
    built = scenario.build(2, **EXACT)
    assert not built.model.training and built.example_input.shape == (2, *scenario.input_shape)
    folded, seconds = nb.fold_scenario(built)
    report = folded.fold_report
    assert seconds > 0
    assert report.rectifier_layers_removed == scenario.expected_removed
    assert sorted(report.removed) == sorted(scenario.states)
    approximate = bool(built.fold_kwargs.get("approximate", False))
    reference = linearized(built.model, built.stats, approximate=approximate)
    assert _rel_error(folded, reference, built.example_input) <= 1e-5
    # a second input, not the one folded on: still the linearized model
    other = scenario.example_input(3, seed=123)
    assert _rel_error(folded, reference, other) <= 1e-5
    flops_ratio = count_flops(folded, other) / count_flops(built.model, other)
    if name == "resnet18":  # the four emptied blocks hold ~46 % of the convs' work: folding must not keep it
        assert flops_ratio < 0.6
    if name == "mlp_block":  # one Linear(384, 384) instead of Linear(384, 1536) + Linear(1536, 384)
        assert built.fold_kwargs.get("approximate") is True
        linears = [m for m in folded.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 1 and linears[0].weight.shape == (384, 384)
        assert flops_ratio == pytest.approx(0.125)


def test_latency_planner_on_a_scenario_plans_for_its_batch_and_collapses_the_linear_blocks():
    """fold_scenario plans for the benchmark's batch; with no timing budget every decision comes from
    FLOPs: MobileNetV2's five linear inverted residuals each merge into one conv with their skip
    (depthwise∘project first: more FLOPs alone, fewer once expand joins), the rest is left alone."""
    from nepenthe.fold.planner import Planner

    scenario = nb.get_scenario("mobilenet_v2")
    built = scenario.build(2, planner=Planner("latency", budget_s=0.0))
    folded, _ = nb.fold_scenario(built)
    report = folded.fold_report
    assert report.planner["latency_input_shape"] == [[2, 3, 32, 32]]
    assert report.planner["decided_by_timing"] == 0 and report.returned == "folded"
    blocks = ("features.3", "features.6", "features.10", "features.13", "features.16")
    assert sorted(report.merges) == sorted(merge for b in blocks for merge in (
        f"{b}.depthwise.conv + {b}.project", f"{b}.expand.conv + {b}.project", f"skip + {b}.project"))
    reference = linearized(built.model, built.stats)
    assert _rel_error(folded, reference, scenario.example_input(3, seed=5)) <= 1e-5


def test_scenarios_are_deterministic():
    s = nb.get_scenario("resnet18")
    a, b = s.model(), s.model()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(s.example_input(4), s.example_input(4))
    for block in ("layer1.1", "layer4.1"):  # emptied convs, as pruning leaves them
        assert not a.get_submodule(f"{block}.conv1").weight.any()
        assert not a.get_submodule(f"{block}.conv2").weight.any()
    assert a.get_submodule("layer1.0.conv1").weight.any()
    bn = a.get_submodule("layer1.0.bn1")  # non-trivial BatchNorm, so that fusing it is tested
    assert not torch.equal(bn.running_var, torch.ones_like(bn.running_var))


def test_fold_arguments_keep_only_what_fold_takes():
    import inspect

    from nepenthe.fold import fold

    kw = nb.fold_arguments({"approximate": True, "planner": "latency", "no_such_option": 1})
    assert kw["approximate"] is True and "no_such_option" not in kw
    assert ("planner" in kw) == ("planner" in inspect.signature(fold).parameters)


def test_unknown_scenario_and_bad_settings():
    with pytest.raises(ValueError, match="unknown scenario 'nope'"):
        nb.get_scenario("nope")
    with pytest.raises(ValueError, match="batch sizes must be >= 1"):
        nb.run_suite(["mlp_block"], batches=[0])
    with pytest.raises(ValueError, match="modes"):
        nb.run_suite(["mlp_block"], batches=[1], modes=["jit"])
    with pytest.raises(ValueError, match="repeats"):
        nb.run_suite(["mlp_block"], batches=[1], repeats=0)


def _suite(tmp_path, **kw):
    args = dict(batches=(1, 2), modes=("eager",), threads=1, repeats=2, warmup=0, planner="all") | kw
    result = nb.run_suite(["mlp_block"], **args)
    return result, nb.write_results(result, tmp_path, say=lambda line: None)


def test_run_suite_rows_json_csv(tmp_path):
    result, paths = _suite(tmp_path)
    rows = result["rows"]
    assert [(r["scenario"], r["batch"], r["mode"]) for r in rows] == [("mlp_block", 1, "eager"),
                                                                      ("mlp_block", 2, "eager")]
    for r in rows:
        assert r["error"] is None
        assert r["before_ms"] > 0 and r["after_ms"] > 0
        assert r["before_min_ms"] <= r["before_ms"] <= r["before_max_ms"]
        assert r["after_min_ms"] <= r["after_ms"] <= r["after_max_ms"]
        assert r["speedup"] == pytest.approx(r["before_ms"] / r["after_ms"])
        assert len(r["before_samples_ms"]) == 2 and r["repeats"] == 2 and r["threads"] == 1
        assert r["flops_before"] == 2 * 2 * r["batch"] * 64 * 384 * 1536  # two matmuls, 2 FLOPs per MAC
        assert r["flops_ratio"] == pytest.approx(0.125)  # one 384x384 Linear instead of 384x1536 + 1536x384
        assert r["params_before"] > r["params_after"]
        assert r["rectifier_layers_removed"] == 1 and r["max_rel_error"] <= 1e-5
        assert r["fold_batch"] == r["batch"]  # folded at each batch size
        assert r["planner_s"] == 0.0 and r["fold_s"] > 0  # planner "all" times nothing
    assert rows[1]["flops_before"] == 2 * rows[0]["flops_before"]
    env = result["environment"]
    for key in ("device", "device_name", "torch", "nepenthe", "python", "threads", "date"):
        assert env[key]
    assert env["threads"] == 1

    data = json.loads(paths["json"].read_text())
    assert data["environment"]["torch"] == torch.__version__
    assert len(data["rows"]) == 2 and "fold_report" in data["rows"][0]
    assert {t["target"] for t in data["targets"]} == {"mlp_block: after/before <= 0.5"}
    with open(paths["csv"], newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == nb.CSV_COLUMNS
        csv_rows = list(reader)
    assert [r["batch"] for r in csv_rows] == ["1", "2"]
    assert float(csv_rows[0]["before_ms"]) == pytest.approx(rows[0]["before_ms"])
    # the same timings in the one measurement schema: the model and the folded model per row
    measured = nb.read_measurements(paths["measurements"])
    assert [(m["case"], m["provider"]) for m in measured] == [
        ("mlp_block batch 1 eager", "model"), ("mlp_block batch 1 eager", "folded"),
        ("mlp_block batch 2 eager", "model"), ("mlp_block batch 2 eager", "folded")]
    assert measured[1]["median_ms"] == pytest.approx(rows[0]["after_ms"])
    assert measured[1]["relative"] == pytest.approx(rows[0]["after_ms"] / rows[0]["before_ms"])
    assert measured[0]["relative"] == 1.0 and measured[0]["suite"] == "latency"
    pytest.importorskip("matplotlib")
    assert paths["png"].stat().st_size > 1000


def test_compile_failure_is_recorded_not_raised(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    result, paths = _suite(tmp_path, batches=(1,), modes=("eager", "compile"))
    eager, comp = result["rows"]
    assert eager["error"] is None and eager["before_ms"] > 0
    assert comp["mode"] == "compile" and comp["error"] == "compile: RuntimeError: no compiler here"
    assert comp["before_ms"] is None and comp["flops_ratio"] == pytest.approx(0.125)
    assert "error" in nb.format_table(result)
    with open(paths["csv"], newline="") as f:
        assert list(csv.DictReader(f))[1]["error"] == comp["error"]


@pytest.mark.slow
def test_compile_row(tmp_path):
    result, _ = _suite(tmp_path, batches=(1,), modes=("compile",))
    (row,) = result["rows"]
    if row["error"] is not None:  # torch.compile cannot work on this machine: recorded as such
        assert row["error"].startswith("compile: ")
    else:
        assert row["compile_before_s"] > 0 and row["compile_after_s"] > 0
        assert row["before_ms"] > 0 and row["after_ms"] > 0


def test_plot_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    said = []
    result = {"environment": {}, "rows": []}
    assert nb.plot_speedups(result, tmp_path / "x.png", say=said.append) is False
    assert len(said) == 1 and "matplotlib" in said[0] and not (tmp_path / "x.png").exists()


def test_targets():
    def row(scenario, batch, ratio, flops_ratio=0.5, mode="eager"):
        return {"scenario": scenario, "batch": batch, "mode": mode, "device": "cpu", "error": None,
                "time_ratio": ratio, "flops_ratio": flops_ratio}

    checks = nb.check_targets({"rows": [row("resnet18", 32, 0.57), row("resnet18", 32, 0.58, mode="compile"),
                                        row("resnet18", 8, 0.9), row("mlp_block", 1, 0.5),
                                        row("mlp_block", 8, 0.51), row("vgg16_bn", 32, 2.0)]})
    assert [(c["mode"], c["batch"], c["met"]) for c in checks] == [
        ("eager", 32, True), ("compile", 32, False), ("eager", 1, True), ("eager", 8, False)]
    assert checks[0]["bound"] == pytest.approx(0.575)
    assert not any("note" in c for c in checks)
    vacuous = row("resnet18", 32, 0.99, flops_ratio=1.0) | {"returned": "original"}
    (check,) = nb.check_targets({"rows": [vacuous]})
    assert check["met"] and "original" in check["note"]


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "b"
    rc = main(["bench", "--scenarios", "mlp_block", "--batches", "1,2", "--modes", "eager", "--repeats", "2",
               "--warmup", "0", "--threads", "1", "--planner", "all", "--fold-batch", "1", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "mlp_block" in text and "speed-up" in text and "target mlp_block" in text
    assert (out / "bench.json").exists() and (out / "bench.csv").exists()
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2] and all(r["threads"] == 1 for r in rows)
    assert [r["fold_batch"] for r in rows] == [1, 1] and rows[0]["fold_s"] == rows[1]["fold_s"]  # folded once


@pytest.mark.parametrize("argv, message", [
    (["--scenarios", "resnet18,nope"], "unknown scenario 'nope'"),
    (["--batches", "1,0"], "batch sizes must be >= 1, got 0"),
    (["--modes", "eager,jit"], "unknown mode 'jit'"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--fold-batch", "0"], "--fold-batch must be >= 1"),
])
def test_cli_bad_arguments_one_line(argv, message, capsys, tmp_path):
    rc = main(["bench", *argv, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("nepenthe bench: error: ") and message in err
    assert not (tmp_path / "x").exists()


def test_cuda_devices_are_timed_with_cuda_events():
    model = torch.nn.Linear(2, 2)
    assert isinstance(_timer(model, (torch.zeros(1, 2),), 1, torch.device("cuda")), CudaEventTimer)
    assert not isinstance(_timer(model, (torch.zeros(1, 2),), 1, torch.device("cpu")), CudaEventTimer)


def test_plot_leaves_the_users_matplotlib_backend_alone(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    before = matplotlib.get_backend()
    result, paths = _suite(tmp_path, batches=(1,))
    assert paths["png"].stat().st_size > 1000 and matplotlib.get_backend() == before


def test_cli_json_output_is_the_only_stdout(tmp_path, capsys):
    rc = main(["bench", "--scenarios", "mlp_block", "--batches", "1", "--modes", "eager", "--repeats", "2",
               "--warmup", "0", "--threads", "1", "--planner", "all", "--out", str(tmp_path / "b"), "--json"])
    assert rc == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)  # stdout is one JSON object, the table went to stderr
    assert payload["rows"][0]["scenario"] == "mlp_block" and payload["rows"][0]["speedup"] > 0
    assert payload["targets"] and "mlp_block" in captured.err
