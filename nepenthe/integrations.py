"""Callbacks that keep a pruned model's masks inside other libraries' trainers (optional imports:
nothing here imports Lightning or transformers until a callback is built).

Both re-apply the masks of :mod:`nepenthe.masks` after every optimizer step (and zero the optimizer
state there), like :func:`nepenthe.loop.masks_enforced`, which covers any ``torch.optim`` optimizer
without a callback; these are for trainers configured by callbacks.

    trainer = transformers.Trainer(model=model, ..., callbacks=[nepenthe.integrations.hf_keep_masks()])
    trainer = lightning.Trainer(..., callbacks=[nepenthe.integrations.lightning_keep_masks()])
"""

from __future__ import annotations

import torch.nn as nn

from .loop.masked_training import enforce_masks

__all__ = ["hf_keep_masks", "lightning_keep_masks"]


def hf_keep_masks(model: nn.Module | None = None):
    """A ``transformers.TrainerCallback`` that re-applies the masks after each optimizer step (of
    ``model``, or of the model the Trainer passes to its callbacks)."""
    from transformers import TrainerCallback

    class KeepMasks(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            enforce_masks(model if model is not None else kwargs["model"], kwargs.get("optimizer"))

    return KeepMasks()


def lightning_keep_masks():
    """A Lightning ``Callback`` that re-applies the masks of the ``LightningModule`` after each
    optimizer step (``lightning`` or, for older installs, ``pytorch_lightning``)."""
    try:
        from lightning.pytorch import Callback
    except ImportError:
        from pytorch_lightning import Callback

    class KeepMasks(Callback):
        # After the batch's optimizer step(s), outside the training closure: Lightning 2 calls
        # on_before_zero_grad between the forward and the backward, where an in-place change of a
        # weight would break the autograd graph. Re-applying masks is idempotent, so with gradient
        # accumulation (no step on some batches) this only costs a pass over the masked weights.
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            optimizers = list(getattr(trainer, "optimizers", None) or [None])
            for optimizer in optimizers:
                enforce_masks(pl_module, optimizer)

    return KeepMasks()
