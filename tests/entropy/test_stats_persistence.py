"""EntropyStats as users keep them: torch.save / torch.load (also weights_only=True, torch's default),
copies that keep their device, and a one-line repr."""

from __future__ import annotations

import copy
import io

import torch
import torch.nn as nn

import nepenthe


def _stats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU6(), nn.Linear(8, 3))
    return nepenthe.measure(model, [torch.randn(16, 6), torch.randn(16, 6)])


def test_torch_load_weights_only_round_trip():
    stats = _stats()
    buf = io.BytesIO()
    torch.save(stats, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)
    assert type(back) is type(stats) and back.batches == stats.batches == 2
    assert back.histogram.keys() == stats.histogram.keys()
    for k in stats.histogram:
        assert torch.equal(back.histogram[k], stats.histogram[k])
        assert back.sites[k] == stats.sites[k]
    assert back.layer_entropy == stats.layer_entropy and back.options == stats.options


def test_copies_and_repr():
    stats = _stats()
    deep, shallow = copy.deepcopy(stats), copy.copy(stats)
    assert deep.histogram["1"] is not stats.histogram["1"] and torch.equal(deep.histogram["1"], stats.histogram["1"])
    assert shallow.histogram is stats.histogram
    text = repr(stats)
    assert text.startswith("EntropyStats(2 rectifier sites, 16 neurons, 2 batches, zero-entropy sites ")
    assert "\n" not in text and len(text) < 200


def test_no_observation_is_not_zero_entropy_and_fold_keeps_it():
    """A layer the data never reached is unknown, not always-OFF: fold must not delete it."""
    import pytest

    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(nepenthe.MeasureError, match="held no samples"):
        nepenthe.measure(model, [torch.randn(0, 6)])
    stats = nepenthe.measure(model, [torch.randn(16, 6)])
    stats.histogram["1"].zero_()  # as if no sample had reached it
    assert not bool(stats.always_off["1"].any()) and not stats.linearizable("1")
    assert stats.zero_entropy_layers == []
    x = torch.randn(16, 6)
    folded = nepenthe.fold(model, stats, x)
    assert folded.fold_report.rectifier_layers_removed == 0
    torch.testing.assert_close(folded(x), model(x))
