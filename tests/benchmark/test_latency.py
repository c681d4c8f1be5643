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
