import math

import pytest
import torch
import torch.nn as nn

import nepenthe


def test_latency_fields_and_order():
    small = nn.Linear(8, 8)
    res = nepenthe.latency(small, torch.randn(4, 8), warmup=1, repeats=5, threads=1)
    assert res.repeats == 5 and len(res.samples_ms) == 5 and res.threads == 1 and res.number >= 1
    assert 0 < res.min_ms <= res.median_ms <= res.max_ms
    assert res.iqr_ms >= 0 and math.isfinite(res.mean_ms)
    assert set(res.to_dict()) >= {"median_ms", "iqr_ms", "samples_ms", "device"}


def test_latency_restores_threads_and_mode():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5))
    model.train()
    before = torch.get_num_threads()
    nepenthe.latency(model, torch.randn(2, 8), warmup=0, repeats=2, number=1, threads=1)
    assert torch.get_num_threads() == before


def test_compare_latency_sees_a_real_difference():
    # 64 stacked 256-wide layers against one: the ratio is far beyond timing noise
    deep = nn.Sequential(*[nn.Linear(256, 256) for _ in range(64)])
    shallow = nn.Linear(256, 256)
    x = torch.randn(32, 256)
    a, b = nepenthe.compare_latency(deep, shallow, x, warmup=1, repeats=5, threads=1)
    assert a.number == b.number
    assert a.median_ms > 5 * b.median_ms


def test_latency_rejects_bad_repeats():
    with pytest.raises(ValueError, match="repeats"):
        nepenthe.latency(nn.Linear(2, 2), torch.randn(1, 2), repeats=0)


# ----- a spread too wide to trust says so (issue 14 item 11) -------------------------------------------------
def test_quiet_samples_are_not_noisy():
    from nepenthe.latency import _summarise
    r = _summarise([0.0380, 0.0385, 0.0379, 0.0391, 0.0383], 1, 1, torch.device("cpu"))
    assert not r.noisy and r.noise == "" and r.to_dict()["noisy"] is False


def test_a_loaded_machine_flags_the_result():
    """The issue's case: a model whose fastest block took 38 ms, with a median of 656 ms."""
    from nepenthe.latency import _summarise
    r = _summarise([0.038, 0.656, 0.640, 0.700, 0.660], 1, 2, torch.device("cpu"))
    assert r.noisy and "the fastest block" in r.noise and "17.3x" in r.noise


def test_wide_iqr_alone_flags_the_result():
    from nepenthe.latency import _summarise
    r = _summarise([0.010, 0.010, 0.012, 0.014, 0.015, 0.016], 1, 1, torch.device("cpu"))
    assert r.noisy and "IQR" in r.noise and "fastest" not in r.noise


def test_noisy_measurement_warns_and_marks_its_rows():
    """Calls that take 1 ms or 8 ms by turns: the median cannot be trusted, and the result says so."""
    import time

    from nepenthe.benchmark import markdown_table, rows_from_results
    state = {"i": 0}

    def erratic():
        state["i"] += 1
        time.sleep(0.008 if state["i"] % 3 == 0 else 0.001)

    with pytest.warns(RuntimeWarning, match=r"noisy latency \(erratic: .*unreliable"):
        res = nepenthe.compare_calls({"erratic": erratic, "steady": lambda: None}, warmup=0, repeats=9, threads=1)
    assert res["erratic"].noisy  # (on a busy machine even the no-op's sub-microsecond blocks may spread)
    rows = rows_from_results("case", res)
    assert [r["noisy"] for r in rows] == [res["erratic"].noisy, res["steady"].noisy]
    assert " noisy |" in markdown_table(rows)
