"""Models as users bring them: wrapped by torch.compile / DataParallel, or carrying torch.nn.utils.prune
or a parametrization (refused with an error that names the module and the fix; converted both ways)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

import nepenthe
from nepenthe.errors import ForeignPruningError
from nepenthe.mask_interop import adopt_torch_prune, export_torch_prune, foreign_pruning, unwrap_model
from nepenthe.masks import get_mask, set_mask


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


DATA = [torch.randn(16, 6, generator=torch.Generator().manual_seed(1))]


def test_wrapped_models_are_measured_under_their_own_names():
    model = _net()
    plain = nepenthe.measure(model, DATA)
    for wrapped in (torch.compile(model), nn.DataParallel(model), torch.compile(nn.DataParallel(model))):
        assert unwrap_model(wrapped) is model
        stats = nepenthe.measure(wrapped, DATA)
        assert list(stats.histogram) == list(plain.histogram) == ["1"]  # no "_orig_mod." / "module." prefix
        assert torch.equal(stats.histogram["1"], plain.histogram["1"])


def test_ddp_wrapped_model_is_measured_pruned_and_folded_under_its_own_names(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = _net()
        plain = nepenthe.measure(model, DATA)
        wrapped = nn.parallel.DistributedDataParallel(model)
        assert unwrap_model(wrapped) is model
        stats = nepenthe.measure(wrapped, DATA)
        assert list(stats.histogram) == ["1"] and torch.equal(stats.histogram["1"], plain.histogram["1"])
        step = nepenthe.prune_step(wrapped, DATA, config=nepenthe.PruneConfig(zeta=0.5))
        assert set(step.pruned) <= {"0", "2"} and get_mask(model[0]) is not None  # the masks are on the module
        folded = nepenthe.fold(wrapped, stats, DATA[0])
        assert not any(name.startswith("module.") for name in folded.state_dict())
    finally:
        dist.destroy_process_group()


def test_torch_prune_models_are_refused_naming_the_module_and_the_fix():
    model = _net()
    torch_prune.l1_unstructured(model[0], "weight", amount=0.5)
    assert foreign_pruning(model) == {"0": ["torch.nn.utils.prune on weight"]}
    for call in (lambda: nepenthe.measure(model, DATA),
                 lambda: nepenthe.prune(model, DATA, retrain=lambda m, i: None, evaluate=lambda m: 50.0),
                 lambda: nepenthe.fold(model, nepenthe.measure(_net(), DATA), DATA[0])):
        with pytest.raises(ForeignPruningError, match=r"0: torch.nn.utils.prune on weight.*adopt_torch_prune"):
            call()


def test_parametrized_models_are_refused():
    class Keep(nn.Module):
        def forward(self, w):
            return w * (w.abs() > 0.1)

    model = _net()
    parametrize.register_parametrization(model[2], "weight", Keep())
    with pytest.raises(ForeignPruningError, match=r"2: a parametrization .* on weight.*remove_parametrizations"):
        nepenthe.measure(model, DATA)


def test_adopt_and_export_torch_prune_round_trip():
    model = _net()
    torch_prune.l1_unstructured(model[0], "weight", amount=0.5)
    their_mask = model[0].weight_mask.clone()
    their_weight = model[0].weight.detach().clone()
    assert adopt_torch_prune(model) == ["0.weight"]
    assert foreign_pruning(model) == {} and isinstance(model[0].weight, nn.Parameter)
    assert get_mask(model[0]).dtype == torch.bool and torch.equal(get_mask(model[0]), their_mask != 0)
    assert torch.equal(model[0].weight, their_weight)
    nepenthe.measure(model, DATA)  # accepted now
    keep = torch.rand(3, 8, generator=torch.Generator().manual_seed(2)) > 0.5
    set_mask(model[2], keep)
    out = model(DATA[0])
    assert export_torch_prune(model) == ["0.weight", "2.weight"]
    assert isinstance(model[2].weight_orig, nn.Parameter) and model[2].weight_mask.dtype == torch.float32
    assert torch.equal(model[2].weight_mask, keep.float()) and torch.allclose(model(DATA[0]), out)
    assert sorted(adopt_torch_prune(model)) == ["0.weight", "2.weight"] and torch.equal(get_mask(model[2]), keep)
