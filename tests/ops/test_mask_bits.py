"""Bit-packed masks: layout (numpy's packbits, little bit order), round trips and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nepenthe.ops import pack_mask, packed_mask_bytes, unpack_mask
from nepenthe.ops.mask_bits import as_bool_mask, is_packed_mask


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (8,), (9,), (3, 5, 7), (64, 3, 3, 3)])
def test_pack_matches_numpy_packbits_and_round_trips(shape):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(shape, generator=g) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (packed_mask_bytes(mask.numel()),)
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy().reshape(-1), bitorder="little"))
    assert torch.equal(unpack_mask(packed, shape), mask)
    assert is_packed_mask(packed, torch.empty(shape)) and torch.equal(as_bool_mask(packed, torch.empty(shape)), mask)


def test_padding_bits_are_zero_and_layout_is_row_major():
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert pack_mask(mask).tolist() == [255, 3]  # 10 elements: 8 bits, then 2 bits and six zero bits
    t = torch.tensor([[True, False], [False, False]]).t()  # non-contiguous: packed in its logical order
    assert pack_mask(t).tolist() == [1] and torch.equal(unpack_mask(pack_mask(t), (2, 2)), t)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="expected a bool mask"):
        pack_mask(torch.ones(4))
    with pytest.raises(ValueError, match=r"a packed mask of \(3, 5\) must be uint8\[2\]"):
        unpack_mask(torch.zeros(3, dtype=torch.uint8), (3, 5))
    assert not is_packed_mask(torch.zeros(2, dtype=torch.uint8), torch.empty(20))
