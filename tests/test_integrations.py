"""The trainer callbacks keep the masks (Hugging Face's TrainerCallback signature; Lightning when it
is installed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nepenthe.integrations import hf_keep_masks, lightning_keep_masks
from nepenthe.masks import set_mask


def _masked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    mask = torch.rand(8, 6) > 0.5
    set_mask(model[0], mask)
    return model, mask


def _steps(model, opt, after_step, n=3):
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    for _ in range(n):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        after_step()


def test_hf_callback_keeps_masks():
    from tests.test_untraceable_models import _transformers

    tf = _transformers()
    model, mask = _masked()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    callback = hf_keep_masks()
    assert isinstance(callback, tf.TrainerCallback)
    args, state, control = None, tf.TrainerState(), tf.TrainerControl()
    _steps(model, opt, lambda: callback.on_optimizer_step(args, state, control, model=model, optimizer=opt))
    assert bool((model[0].weight[~mask] == 0).all())
    assert bool((opt.state[model[0].weight]["exp_avg"][~mask] == 0).all())


def test_lightning_callback_keeps_masks():
    try:
        callback = lightning_keep_masks()
    except ImportError:
        pytest.skip("neither lightning nor pytorch_lightning is installed")
    model, mask = _masked()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.5)
    _steps(model, opt, lambda: callback.on_before_zero_grad(None, model, opt))
    assert bool((model[0].weight[~mask] == 0).all())
