"""The functional route of measure (nepenthe/entropy/functional.py): functional rectifier calls
counted in the model's own forward, as FSDP2 models need, named and counted exactly as the graph
route does. Tested in one process by sending an ordinary model down that route (the FSDP2 check and
the graph are patched); tests/distributed/test_functional_fsdp.py runs it on real FSDP2 ranks."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nepenthe.entropy import MeasureError, measure
from nepenthe.errors import TraceError

measure_module = importlib.import_module("nepenthe.entropy.measure")  # the package's `measure` is the function


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.relu(self.fc(x))  # functional, in a block called twice: b.relu() and b@1.relu()
        x = self.act(x - 0.1)  # a module called twice per block call
        return self.act(x + 0.1 * x.mean())


class Mixed(nn.Module):
    """Module, functional, Tensor-method, inplace and repeated rectifier calls."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.inplace = nn.ReLU(inplace=True)
        self.fc1 = nn.Linear(4 * 4 * 4, width)
        self.b = Block(width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, 5)
        self.gelu = nn.GELU()

    def forward(self, x):
        x = self.inplace(self.conv(x))
        x = torch.relu_(x - 0.05)  # functional, inplace, on a conv map (neuron dim 1)
        x = self.fc1(x.flatten(1)).relu()  # Tensor method, in the root: relu()
        x = self.b(self.b(x))
        x = F.leaky_relu(self.fc2(x), 0.2, inplace=True)
        x = F.gelu(self.gelu(x) - 0.1, approximate="tanh")
        x = torch.relu(x) + F.relu(input=x - 0.2)  # torch.relu and a keyword input
        return self.fc3(x).relu_()  # Tensor method, inplace


# the graph route's names: module sites, #k for a module's later calls, `owner.function()` for functional
# calls (`b@1.` for the second call of block b), execution order
NAMES = ["inplace", "relu_()", "relu()", "b.relu()", "b.act", "b.act#1", "b@1.relu()", "b.act#2", "b.act#3",
         "leaky_relu()", "gelu", "gelu()", "relu()#1", "relu()#2", "relu_()#1"]


def _forced(monkeypatch) -> None:
    """Measure as for an FSDP2 model: no runnable graph, the model's own forward."""
    def no_graph(model):
        raise TraceError("forced onto the functional route")
    monkeypatch.setattr(measure_module, "_probed_graph", no_graph)
    monkeypatch.setattr(measure_module, "is_fully_sharded", lambda model: True)


def _data():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 4, 4, generator=g) for n in (5, 0, 7, 3)]


@pytest.mark.parametrize("estimator", ["pooled", "batch_mean"])
def test_functional_route_equals_graph_route(monkeypatch, estimator):
    torch.manual_seed(0)
    model = Mixed()
    graph = measure(model, _data(), estimator=estimator)
    _forced(monkeypatch)
    hooked = measure(model, _data(), estimator=estimator)
    assert list(hooked.histogram) == list(graph.histogram) == NAMES
    for name, counts in graph.histogram.items():
        assert counts.dtype == torch.int64
        assert torch.equal(hooked.histogram[name], counts), name
        if graph.sites[name].module_path is None:  # functional: the structure graph's site, as the graph route's
            assert hooked.sites[name] == graph.sites[name], name
        else:  # module sites: the hook route's (its producer is found by tensor identity, as before)
            assert hooked.sites[name].rectifier == graph.sites[name].rectifier, name
            assert hooked.sites[name].channel_dim == graph.sites[name].channel_dim, name
    if estimator == "batch_mean":
        for name in graph.histogram:
            assert torch.equal(hooked.batch_neuron_sum[name], graph.batch_neuron_sum[name]), name


class Branchy(nn.Module):
    """A forward that does not run as it was traced (the trace takes the ``training`` branch)."""

    def __init__(self, eval_branch):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.eval_branch = eval_branch

    def forward(self, x):
        x = self.fc(x)
        return F.relu(x) if self.training else self.eval_branch(x)


@pytest.mark.parametrize("eval_branch, match", [
    (F.silu, r"call 0 of silu\(\) in the forward of 'the root module' of Branchy is not a rectifier call site of its "
             r"torch.fx structure graph \(which has \['relu\(\)'\]\)"),
    (torch.tanh, r"did not call the functional rectifier\(s\) \['relu\(\)'\]"),
])
def test_a_call_that_does_not_match_the_structure_graph_is_an_error(monkeypatch, eval_branch, match):
    _forced(monkeypatch)
    original = measure_module.functional_probes

    def traced_in_training_mode(model, *args):
        model.train()
        try:
            return original(model, *args)
        finally:
            model.eval()
    monkeypatch.setattr(measure_module, "functional_probes", traced_in_training_mode)
    model = Branchy(eval_branch)
    with pytest.raises(MeasureError, match=match):
        measure(model, [torch.randn(2, 4)])
    assert not model.fc._forward_pre_hooks and not model._forward_hooks  # the probes are gone


class OnlyFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return F.silu(self.fc2(F.relu6(self.fc1(x))))


def test_a_model_without_activation_modules(monkeypatch):
    torch.manual_seed(0)
    model, data = OnlyFunctional(), [torch.randn(6, 4) * 4, torch.randn(3, 4)]
    graph = measure(model, data)
    _forced(monkeypatch)
    hooked = measure(model, data)
    assert list(hooked.histogram) == list(graph.histogram) == ["relu6()", "silu()"]
    for name in graph.histogram:
        assert torch.equal(hooked.histogram[name], graph.histogram[name]), name


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(4, 4), nn.ReLU()

    def forward(self, x):
        x = self.act(self.fc(x))
        return F.relu(x) if x.sum() > 0 else x  # data-dependent: no structure graph either


def test_without_a_structure_graph_only_modules_are_measured_with_a_warning(monkeypatch):
    _forced(monkeypatch)
    with pytest.warns(UserWarning, match="naming functional rectifier calls needs a torch.fx-traceable model.*"
                                         "Measuring activation modules only"):
        stats = measure(Untraceable(), [torch.randn(3, 4)])
    assert list(stats.histogram) == ["act"]
