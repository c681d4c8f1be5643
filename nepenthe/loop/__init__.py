"""The iterative NEPENTHE loop (docs/method.md §3) and its baselines, with back-off, checkpoints and resume.

::

    result = nepenthe.prune(model, calib_loader,
                            retrain=lambda m, it: my_train(m),      # masks are yours to keep:
                            evaluate=lambda m: my_val_accuracy(m),  # see nepenthe.masks
                            config=nepenthe.PruneConfig(max_iters=5, delta=1.0))

The loop knows nothing of kernels or data formats: it calls ``measure``, the budget, the mask
helpers and the two user functions. ``retrain`` must keep the masks enforced after every
optimizer step (``nepenthe.loop.keep_masks_after_steps`` or the built-in trainer do it).

A step cannot destroy the model:

* **back-off** — when an iteration's validation accuracy falls below dense − δ, or retraining
  diverges (``retrain`` raises ``FloatingPointError``, as the built-in trainer does on a NaN/Inf
  loss, or leaves non-finite weights), the iteration's start is restored and the step retried
  with its pruning amount multiplied by ``backoff_factor`` — for the entropy budget, every
  layer's share of the full-ζ allocation, so a layer the full step would empty is only thinned;
  for IMP the global fraction; EASIER, which removes one activation per step, tries the
  next-lowest-entropy one instead — at most ``max_backoffs`` times. The next
  iteration keeps the smaller step; an iteration that passes at once lets it grow one notch
  back towards ζ. Every failed attempt is in the record.
* **no cut** — a layer whose emptying would disconnect the output from the input (a stem, any
  conv of a plain chain: every later neuron would be constant) is capped at ``cut_max_sparsity``,
  and the entropy budget (NEPENTHE, EGP) prunes it no faster than the step's rate ζ: the sharp
  softmax would otherwise give a small, least relevant cut layer its whole share in one step.
  A residual branch is not capped: emptied, it becomes a constant that folding removes exactly.
* **per-layer caps and protected layers** — ``layer_caps`` (glob → max sparsity), ``protect``
  (globs, plus ``"first"`` / ``"last"`` for the linear ops next to the input / output) and
  ``filter_fn(module, fqn)``.
* **masks a user loop cannot undo** — ``retrain`` runs inside :func:`masks_enforced` (every
  ``torch.optim`` step re-applies the masks), and weights revived any other way are zeroed with a
  warning (:func:`repair_masked_weights`), so the sparsity reported is the model's.
* **evaluate's scale** — percent, or a fraction (read as one, with a warning; or say it with
  ``PruneConfig(metric_scale=...)``).
"""

from ..errors import CheckpointError, PruneError
from .config import METHODS, SELECT_RULES, IterationRecord, PruneConfig, PruneResult
from .iterate import prune, prune_, prune_step, select_iteration
from .masked_training import (
    enforce_masks,
    keep_masks_after_steps,
    masked_optimizer,
    masks_enforced,
    repair_masked_weights,
)
from .methods import EASIER, EGP, IMP, Nepenthe, PruningMethod, get_method
from .pruner import Pruner, Step

__all__ = ["EASIER", "EGP", "IMP", "METHODS", "SELECT_RULES", "CheckpointError", "IterationRecord", "Nepenthe",
           "PruneConfig", "PruneError", "PruneResult", "Pruner", "PruningMethod", "Step", "enforce_masks", "get_method",
           "keep_masks_after_steps", "masked_optimizer", "masks_enforced", "prune", "prune_", "prune_step",
           "repair_masked_weights", "select_iteration"]
