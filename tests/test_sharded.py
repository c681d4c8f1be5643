"""nepenthe.sharded and the FSDP2 side of nepenthe.masks on plain tensors, in one process (the
sharded behaviour is tested by tests/distributed/test_packed_fsdp.py): every helper passes plain
tensors through, and the whole-tensor mask forms are the one-process ones."""

from __future__ import annotations

import torch
import torch.nn as nn

from nepenthe.masks import (
    full_mask,
    get_mask,
    pack_mask,
    restore_masks,
    set_mask,
    shard_packed_mask,
    stored_mask,
    whole_packed_masks,
)
from nepenthe.sharded import counted_here, from_local_like, full, local, sharded_sum


def _masked(packed: bool) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Linear(13, 7)
    keep = torch.rand(7, 13) > 0.4
    set_mask(layer, keep, packed=packed)
    return layer, keep


def test_plain_tensors_pass_through():
    t = torch.arange(10)
    assert counted_here(t) and sharded_sum(5, t) == 5
    assert from_local_like(t, t) is t and full(t) is t and local(t) is t
    bits = pack_mask(t > 4)
    assert shard_packed_mask(bits, torch.zeros(10)) is bits


def test_full_mask_is_the_stored_form_of_a_plain_layer():
    for packed in (False, True):
        layer, keep = _masked(packed)
        got = full_mask(layer)
        assert got.dtype == (torch.uint8 if packed else torch.bool)
        assert torch.equal(got, pack_mask(keep) if packed else keep)
    assert full_mask(nn.Linear(3, 2)) is None


def test_whole_packed_masks_is_empty_without_sharded_parameters():
    model = nn.Sequential(_masked(True)[0], nn.ReLU(), _masked(False)[0])
    assert whole_packed_masks(model) == {}


def test_packed_restore_of_a_plain_model_keeps_the_whole_bits():
    layer, keep = _masked(True)
    state = layer.state_dict()
    fresh = nn.Linear(13, 7)
    restore_masks(fresh, state)
    fresh.load_state_dict(state)
    assert stored_mask(fresh).dtype == torch.uint8 and torch.equal(stored_mask(fresh), pack_mask(keep))
    assert torch.equal(get_mask(fresh), keep)
    assert torch.equal(fresh.weight, layer.weight)


def test_full_state_dict_keys_drop_wrapper_prefixes():
    from nepenthe.sharded import _full_key

    model = nn.Sequential(nn.Linear(3, 2))
    assert _full_key(model, "0.weight_mask_bits") == "0.weight_mask_bits"
    assert _full_key(torch.compile(model), "_orig_mod.0.weight") == "0.weight"
