"""The trainer callbacks keep the masks (Hugging Face's TrainerCallback signature; Lightning when it
is installed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nepenthe.integrations import hf_keep_masks, lightning_keep_masks
from nepenthe.masks import masked_parameters, set_mask


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
    trainer = type("Trainer", (), {"optimizers": [opt]})()
    _steps(model, opt, lambda: callback.on_train_batch_end(trainer, model, None, None, 0))
    assert bool((model[0].weight[~mask] == 0).all())


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning", reason="neither lightning nor pytorch_lightning is installed")
    return pl


@pytest.mark.parametrize("with_callback", [False, True])
def test_lightning_trainer_as_retrain_reports_the_real_sparsity(with_callback):
    """A Lightning ``Trainer.fit`` (AdamW with weight decay) as ``retrain``: at every iteration the
    reported sparsity is the masks' and every masked weight is zero (the loop's step hook alone,
    and with the callback)."""
    import warnings

    from nepenthe import PruneConfig, prune
    from nepenthe.train import evaluate
    from tests.loop.test_loop import make_model
    from tests.loop.test_user_loops import real_masked_fraction

    pl = _lightning()
    from nepenthe.data import load_dataset, make_loader

    splits = load_dataset("digits", limit=96)
    calib, val = make_loader(splits.train, 48), make_loader(splits.val, 96)

    class Lit(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)

    def retrain(model, iteration):
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[lightning_keep_masks()] if with_callback else [])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's advice on num_workers and the like
            trainer.fit(Lit(model), train_dataloaders=calib)

    checks = []

    def check(record, model):
        kept = total = 0
        for _, _, mask in masked_parameters(model):
            kept, total = kept + int(mask.sum()), total + mask.numel()
        checks.append((record.iteration, record.sparsity, kept, total, real_masked_fraction(model)))

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no repair needed: nothing revived a masked weight
        torch.manual_seed(0)
        result = prune(make_model(), calib, retrain=retrain, evaluate=lambda m: evaluate(m, val),
                       config=PruneConfig(max_iters=2, delta=None), callbacks=[check])
    assert len(result.iterations) == 3 and result.iterations[-1].sparsity > 0
    for iteration, reported, kept, total, (zero, masked) in checks[1:]:
        assert zero == masked, f"iteration {iteration}: {masked - zero} masked weights revived"
        assert reported == pytest.approx(1 - kept / total, abs=0), iteration
