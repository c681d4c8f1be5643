"""structure_key, and measure's reuse of its probed trace while a model's structure is unchanged:
the reused graph must give exactly the counts of a fresh trace, and anything a trace depends on
(submodules, parameters as objects, plain attributes read by forward, hooks) forces a re-trace."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn as nn
import torch.utils._python_dispatch as python_dispatch

import nepenthe.entropy.probes as probes
from nepenthe import ops
from nepenthe.entropy import clear_trace_cache, measure
from nepenthe.structure import structure_key


class Switch(nn.Module):
    """forward reads a plain attribute: fx bakes the branch into the graph."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 5)
        self.use_gelu = False

    def forward(self, x):
        z = self.fc1(x)
        z = torch.nn.functional.gelu(z) if self.use_gelu else torch.relu(z)
        return self.fc2(z).relu()


@pytest.fixture
def traces(monkeypatch):
    """Counts the model traces measure makes."""
    calls = []
    real = probes.trace
    monkeypatch.setattr(probes, "trace", lambda model, purpose="": calls.append(model) or real(model, purpose))
    clear_trace_cache()
    yield calls
    clear_trace_cache()


def _fresh(model, data):
    clear_trace_cache()
    return measure(model, data, distributed=False)


def _same(a, b):
    assert list(a.histogram) == list(b.histogram)
    for k in a.histogram:
        assert torch.equal(a.histogram[k], b.histogram[k]), k


def test_key_equal_for_unchanged_model_and_values_do_not_matter():
    model = Switch()
    key = structure_key(model)
    with torch.no_grad():
        model.fc1.weight.mul_(-1)  # in place: the same object
    assert key.matches(structure_key(model))
    model.use_gelu = True
    assert not key.matches(structure_key(model))


def test_key_sees_replaced_objects_and_hooks():
    model = Switch()
    key = structure_key(model)
    model.fc1.weight = nn.Parameter(model.fc1.weight.detach().clone())
    assert not key.matches(structure_key(model))
    key = structure_key(model)
    model.fc2 = nn.Linear(8, 5)
    assert not key.matches(structure_key(model))
    key = structure_key(model)
    handle = model.register_forward_hook(lambda m, a, out: out * 2)
    assert not key.matches(structure_key(model))
    handle.remove()
    assert key.matches(structure_key(model))


def test_key_of_a_freed_module_never_matches_a_new_one():
    model = Switch()
    key = structure_key(model)
    model.fc2 = nn.Linear(8, 5)  # the old fc2 is freed; a new object may reuse its address
    gc.collect()
    assert not key.alive()
    assert not key.matches(structure_key(model))


def test_measure_reuses_its_trace_and_counts_the_new_weights(traces):
    torch.manual_seed(0)
    model, data = Switch(), [torch.randn(16, 6) for _ in range(3)]
    first = measure(model, data, distributed=False)
    with torch.no_grad():
        model.fc1.weight.mul_(-1)  # pruning changes values only
    second = measure(model, data, distributed=False)
    assert len(traces) == 1
    fresh = _fresh(model, data)
    _same(second, fresh)
    assert not torch.equal(first.histogram["relu()"], second.histogram["relu()"])


def test_measure_retraces_when_forward_would_trace_differently(traces):
    torch.manual_seed(0)
    model, data = Switch(), [torch.randn(16, 6)]
    assert list(measure(model, data, distributed=False).histogram) == ["relu()", "relu()#1"]
    model.use_gelu = True
    stats = measure(model, data, distributed=False)
    assert list(stats.histogram) == ["gelu()", "relu()"]
    assert len(traces) == 2
    _same(stats, _fresh(model, data))


def test_measure_after_a_submodule_swap_uses_the_new_module(traces):
    torch.manual_seed(0)
    model, data = Switch(), [torch.randn(16, 6)]
    measure(model, data, distributed=False)
    model.fc1 = nn.Linear(6, 8)
    stats = measure(model, data, distributed=False)
    assert len(traces) == 2
    with torch.no_grad():
        want = ops.sign_histogram(model.fc1(data[0]), -1)
    assert torch.equal(stats.histogram["relu()"], want)


def test_kept_trace_lets_the_model_and_the_counts_go():
    clear_trace_cache()
    model = Switch()
    measure(model, [torch.randn(4, 6)], distributed=False)
    kept = probes._PROBED_GRAPHS[model]
    assert all(p.acc is None for p in kept.probes)  # no call's accumulator stays referenced
    ref = weakref.ref(model)
    del model, kept
    gc.collect()
    assert ref() is None


def test_measure_inside_measure_traces_its_own_graph(traces):
    model, inner = Switch(), []

    def input_fn(batch):
        inner.append(measure(model, [batch], distributed=False))
        return batch
    data = [torch.randn(8, 6), torch.randn(8, 6)]
    outer = measure(model, data, input_fn=input_fn, distributed=False)
    assert outer.num_samples["relu()"] == 16
    assert [s.num_samples["relu()"] for s in inner] == [8, 8]


# ----- the ops' eager fast path ------------------------------------------------------------------------


class _Record(python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_ops_go_through_the_dispatcher_whenever_a_mode_is_active():
    x = torch.randn(4, 3, 5)
    with _Record() as rec:
        ops.sign_histogram(x, 1)
        ops.accumulate_activation_histogram(x, torch.zeros(3, 5, dtype=torch.int64), "relu", 1)
    assert any("nepenthe.sign_histogram" in op for op in rec.ops)
    assert any("nepenthe.accumulate_activation_histogram" in op for op in rec.ops)


def test_accumulate_activation_histogram_adds_and_refuses_autograd():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3)
    hist = torch.zeros(4, 5, dtype=torch.int64)
    y1 = ops.accumulate_activation_histogram(x, hist, "silu", 1)
    ops.accumulate_activation_histogram(x, hist, "silu", 1)
    assert torch.equal(hist[:, :4], 2 * ops.reference.sign_histogram(x, 1))
    torch.testing.assert_close(y1, torch.nn.functional.silu(x))
    with pytest.raises(ValueError, match="not differentiable"):
        ops.accumulate_activation_histogram(x.requires_grad_(), hist, "relu", 1)
    with pytest.raises(ValueError, match=r"int64\[4, 4\]"):
        ops.accumulate_activation_histogram(x.detach(), torch.zeros(3, 5, dtype=torch.int64), "relu", 1)
