"""bench/gpu_suite.sh cannot rot: its dry run (CPU, tiny sizes) runs every step but GPU execution.

The dry run (the session fixture ``gpu_suite_dry_run`` of conftest.py, shared with test_gpu_build.py) builds
every .cu for sm_90 with nvcc, collects the very pytest selections the GPU run executes, and runs every
benchmark section on CPU tensors, writing the same files as on the GPU; these tests read those files. The
helpers of the orchestrator (first compiler error, pytest summary, targets, timeouts, a failed build) are
tested directly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "bench" / "gpu_suite.py")
gs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gs)

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")


@pytest.fixture(scope="module")
def dry(gpu_suite_dry_run):
    proc, out, seconds = gpu_suite_dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, out, json.loads((out / "results.json").read_text()), seconds


def test_dry_run_writes_the_same_few_files_and_prints_the_table_last(dry):
    proc, out, result, seconds = dry
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(gs.OUT_FILES) and len(files) <= 8, files  # the device returns at most 8 files
    assert all(p.is_file() and p.stat().st_size > 0 for p in out.iterdir())
    assert sum(p.stat().st_size for p in out.iterdir()) < 2_000_000
    table = (out / "summary.md").read_text().strip()
    assert proc.stdout.rstrip().endswith(table), "the table must be the last thing printed"
    assert len(table) < 12_000, "the caller sees only the last 12000 characters"
    assert table.startswith("# nepenthe GPU suite (DRY RUN")
    env = result["environment"]
    for key in ("torch", "triton", "date", "python", "cpu_count", "nvcc"):
        assert env.get(key), key
        assert str(env[key]) in table, key
    assert result["elapsed_s"] < result["budget_s"]
    print(f"dry run: {seconds:.1f} s")


def test_dry_run_ran_every_step(dry):
    _, out, result, _ = dry
    steps = result["steps"]
    assert set(steps) == set(gs.ALL_STEPS)
    for name, step in steps.items():
        if name == "build" and step["status"] == "skipped":
            assert "nvcc not found" in (out / "build.log").read_text()
            continue
        assert step["status"] == "ok", (name, step)
    table = (out / "summary.md").read_text()
    for name in gs.ALL_STEPS:
        assert f"| {name} | ok |" in table or name == "build"


def test_dry_run_collects_the_gpu_test_selections(dry):
    _, out, result, _ = dry
    for which, (paths, expr) in gs.TEST_SELECTIONS.items():
        info = result["tests"][which]
        assert info["collect_only"] and info["selection"] == {"paths": paths, "k": expr}
        assert info["collected"] > 0, info
        assert f"== {which}: {info['collected']} tests collected" in (out / "tests.txt").read_text()
    # the selections hold the GPU backends' tests and nothing else
    cuda_ids, triton_ids = result["tests"]["cuda"]["node_ids"], result["tests"]["triton"]["node_ids"]
    assert len(cuda_ids) == result["tests"]["cuda"]["collected"]
    assert all(i.startswith("tests/ops/test_backends.py::") and ("[cuda-" in i or "[cuda]" in i) for i in cuda_ids)
    assert all("[triton-" in i or "[triton]" in i or i.startswith("tests/ops/test_triton_aot.py::") for i in triton_ids)
    assert any(i.startswith("tests/ops/test_triton_aot.py::test_gpu_plans") for i in triton_ids)
    assert not any("compiles_for_sm90" in i for i in triton_ids)  # the AOT compile runs in the default suite


def test_dry_run_parity_and_race_checks(dry):
    _, out, result, _ = dry
    parity = result["parity"]
    assert parity["summary"]["checks"] >= 3 * 4 * 5 and parity["summary"]["failed"] == 0, parity["summary"]
    races = [r for r in parity["rows"] if r["kind"] == "race"]
    assert races and all(r["ok"] and r["repeats"] >= 2 for r in races), races
    assert "built-in parity on" in (out / "tests.txt").read_text()


def test_dry_run_benchmark_rows(dry):
    _, out, result, _ = dry
    rows = result["rows"]
    assert not [r for r in rows if r.get("error")], [r for r in rows if r.get("error")]
    cases: dict[str, dict] = {}
    for r in rows:
        assert r["median_ms"] > 0
        cases.setdefault(r["case"], {})[r["provider"]] = r
    assert result["copy_gb_per_s"] > 0
    names = list(cases)
    assert names[0].startswith("copy ")
    backend = result["parity"]["backends"][0]
    mine = f"nepenthe[{backend}]"
    for dtype in ("float32", "bfloat16"):
        case = next(c for c in names if c.startswith("sign_histogram") and c.endswith(dtype))
        assert {mine, "torch"} <= set(cases[case])
        assert cases[case][mine]["pct_copy_bw"] > 0 and cases[case][mine]["bytes"] > 0
    assert "compile" in cases[next(c for c in names if c.startswith("sign_histogram"))]
    for kind in ("relu", "gelu", "silu"):
        case = next(c for c in names if c.startswith(f"activation+histogram {kind} "))
        assert {mine, "torch_activation_only", "torch+histogram"} <= set(cases[case])
    for opt in ("SGD", "AdamW"):
        for dtype in ("float32", "bfloat16"):
            case = f"masked {opt} step ResNet-18 {dtype}"
            assert {mine, "torch_unmasked", "torch_fused_unmasked"} <= set(cases[case]), cases.get(case)
    assert "compile_unmasked" in cases["masked SGD step ResNet-18 float32"]
    measure = next(c for c in names if c.startswith("measure"))
    assert {f"nepenthe_measure[{backend}]", "torch_forward"} <= set(cases[measure])
    fold = result["fold_rows"]
    assert {(r["batch"], r["mode"]) for r in fold} == {(1, "eager"), (2, "eager"), (1, "compile"), (2, "compile")}
    assert all(r["before_ms"] > 0 and r["after_ms"] > 0 and not r["error"] for r in fold), fold
    from nepenthe.benchmark import read_measurements

    csv_rows = read_measurements(out / "results.csv")  # the package's measurement schema
    assert len(csv_rows) == len(rows) + 2 * len(fold)  # a fold row: the model and the folded one
    assert {r["case"] for r in csv_rows} >= set(names)
    assert all(r["median_ms"] > 0 and r["suite"] == "gpu_suite" for r in csv_rows)
    folded = [r for r in csv_rows if r["section"] == "fold" and r["provider"] == "folded"]
    assert len(folded) == len(fold) and all(r["relative"] > 0 for r in folded)


def test_dry_run_marks_every_target(dry):
    _, out, result, _ = dry
    targets = result["targets"]
    table = (out / "summary.md").read_text()
    kinds = {"histogram float32", "histogram bfloat16", "fused relu", "fused gelu", "fused silu",
             "masked SGD float32 >=", "masked SGD float32 <=", "masked AdamW bfloat16 >=", "masked AdamW bfloat16 <=",
             "measure", "folded"}
    for kind in kinds:
        hits = [t for t in targets if t["target"].startswith(kind)]
        assert hits, kind
        assert all(isinstance(t["met"], bool) and t["measured"] > 0 for t in hits), hits
    fold = [t for t in targets if t["target"].startswith("folded ")]
    for t in targets:
        verdict = "met" if t["met"] else "NOT met"
        row = f"| {t['target']} | {t['backend']} | {t['measured']:.3f} {t['unit']} | {t['bound']:g} | {verdict} |"
        assert (row in table) != (t in fold), row  # the fold rows are one line of the targets table
    slower = [t for t in fold if not t["met"]]
    assert f"| folded models never slower ({len(fold) - len(slower)}/{len(fold)} rows) | - | " in table
    assert ("NOT met: " in table.split("| folded models never slower")[1]) == bool(slower)
    assert table.count(" met |") + table.count(" NOT met |") >= len(fold)  # each fold row's own verdict
    assert f"targets met: {sum(t['met'] for t in targets)}/{len(targets)}" in table


# ----- the orchestrator's helpers ---------------------------------------------------------------------------
def test_first_error_finds_the_compiler_error():
    log = ["[1/5] c++ -c csrc/nepenthe_ext.cpp", "FAILED: build/x.o",
           "csrc/cuda/sign_histogram_cuda.cu(41): error: identifier \"blockDimx\" is undefined",
           "      int i = blockDimx;", "1 error detected", "csrc/cpu/x.cpp:3:1: error: later one",
           "error: command '/usr/local/cuda/bin/nvcc' failed with exit code 1"]
    assert gs.first_error(log).splitlines()[0] == log[2]
    assert gs.first_error(["csrc/ops.cpp:10:5: fatal error: ATen/ATen.h: No such file"]).startswith("csrc/ops.cpp")
    assert gs.first_error(["ModuleNotFoundError: No module named 'setuptools'"]).startswith("ModuleNotFound")
    assert gs.first_error(["-Werror=foo is fine", "all good"]) is None


def test_parse_pytest_summary():
    text = "....F.s\nFAILED tests/ops/test_backends.py::test_x[cuda-nchw] - AssertionError\n" \
           "ERROR tests/ops/test_backends.py::test_y[triton]\n= 1 failed, 600 passed, 3 skipped, 1 error in 41.2s ="
    got = gs.parse_pytest(text)
    assert (got["passed"], got["failed"], got["skipped"], got["errors"]) == (600, 1, 3, 1)
    assert got["summary"] == "1 failed, 600 passed, 3 skipped, 1 error in 41.2s"
    assert len(got["failures"]) == 2
    assert gs.parse_pytest("killed")["summary"].startswith("no summary line")


def _row(case, provider, ms, pct=None):
    return {"case": case, "provider": provider, "median_ms": ms, "pct_copy_bw": pct}


def test_targets_are_met_or_not_by_the_issue_bounds():
    by_case = {
        "sign_histogram 256x128x56x56 float32": {"nepenthe[cuda]": _row("", "", 1.0, 90.0),
                                                 "nepenthe[triton]": _row("", "", 1.0, 84.9)},
        "activation+histogram gelu 256x64x56x56 float32": {"nepenthe[cuda]": _row("", "", 1.05),
                                                           "torch_activation_only": _row("", "", 1.0)},
        "masked SGD step ResNet-18 bfloat16": {"nepenthe[cuda]": _row("", "", 1.2, 80.0),
                                               "torch_fused_unmasked": _row("", "", 1.0)},
        "masked AdamW step ResNet-18 float32": {"nepenthe[triton]": _row("", "", 1.0, 50.0)},  # no fused baseline
        "measure ResNet-18 batch 256 x 4": {"nepenthe_measure[cuda]": _row("", "", 10.6),
                                            "torch_forward": _row("", "", 10.0)},
    }
    fold = [{"scenario": "vgg16_bn", "batch": 1, "mode": "eager", "time_ratio": 1.03},
            {"scenario": "vgg16_bn", "batch": 256, "mode": "compile", "time_ratio": 0.7},
            {"scenario": "resnet18", "batch": 1, "mode": "compile", "time_ratio": None, "error": "compile: x"}]
    got = {(t["target"], t["backend"]): t["met"] for t in gs.check_targets(by_case, fold)}
    assert got == {
        ("histogram float32 >= 85% copy bw", "cuda"): True,
        ("histogram float32 >= 85% copy bw", "triton"): False,
        ("fused gelu <= 1.10x plain activation", "cuda"): True,
        ("masked SGD bfloat16 >= 80% copy bw", "cuda"): True,
        ("masked SGD bfloat16 <= 1.10x torch fused unmasked", "cuda"): False,
        ("masked AdamW float32 >= 80% copy bw", "triton"): False,
        ("masked AdamW float32 <= 1.10x torch fused unmasked", "triton"): None,
        ("measure <= 1.05x plain forward", "cuda"): False,
        ("folded vgg16_bn b1 eager never slower", "-"): False,
        ("folded vgg16_bn b256 compile never slower", "-"): True,
    }


def test_a_step_past_its_timeout_is_killed_with_its_process_group(tmp_path):
    log = tmp_path / "log"
    proc = subprocess.Popen(["bash", "-c", "sleep 60 & sleep 60; echo never"], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    start = time.monotonic()
    rc, timed_out = gs.Suite.wait(proc, 0.5, grace=0.5)
    assert timed_out and rc is not None and time.monotonic() - start < 10
    for _ in range(50):  # the background sleep (which ignores SIGINT) too: the whole group is gone
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("a process of the step's group survived")
    assert "never" not in log.read_text()


def test_a_failed_build_shows_the_first_error_and_the_suite_goes_on(tmp_path, monkeypatch):
    """GPU mode with a build that fails: the first compiler error reaches the table and build.log, the CUDA
    tests are skipped with the reason, and the report is still written."""
    fake = ("echo '[1/3] nvcc -c csrc/cuda/a.cu'; echo 'csrc/cuda/a.cu(7): error: expected a \";\"'; "
            "echo 'csrc/cuda/b.cu(9): error: second'; echo 'error: command nvcc failed'; exit 1")
    monkeypatch.setattr(gs.Suite, "build_command", lambda self: (["bash", "-c", fake], {"MAX_JOBS": "1"}))
    out = tmp_path / "out"
    args = ["--device", "cpu", "--tiny", "--only", "build,tests_cuda", "--budget", "60"]
    assert gs.main([str(out), *args]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["steps"]["build"]["status"] == "FAILED"
    assert result["steps"]["build"]["note"] == 'csrc/cuda/a.cu(7): error: expected a ";"'
    assert result["steps"]["tests_cuda"]["status"] == "skipped" and "build FAILED" in result["steps"]["tests_cuda"][
        "note"]
    table = (out / "summary.md").read_text()
    assert 'build first error: `csrc/cuda/a.cu(7): error: expected a ";"`' in table
    log = (out / "build.log").read_text()
    assert log.startswith("# build: FAILED (exit 1)") and "# first error:\ncsrc/cuda/a.cu(7)" in log
    assert sorted(p.name for p in out.iterdir()) == sorted(gs.OUT_FILES)


def test_without_pytest_the_test_steps_fall_back_to_the_built_in_parity_step(tmp_path, monkeypatch):
    monkeypatch.setattr(gs.Suite, "have", lambda self, module: module != "pytest")
    out = tmp_path / "out"
    assert gs.main([str(out), "--device", "cpu", "--tiny", "--only", "tests,tests_cuda", "--budget", "60"]) == 0
    result = json.loads((out / "results.json").read_text())
    for step in ("tests", "tests_cuda"):
        assert result["steps"][step]["status"] == "skipped"
        assert "fallback: built-in parity" in result["steps"][step]["note"]
    text = (out / "tests.txt").read_text()
    assert "== triton: not run: pytest is not installed" in text and "== cuda: not run" in text


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit) as exc:
        gs.main(["/tmp/unused", "--only", "kernels,gpu"])
    assert exc.value.code == 2
