"""The loop's checkpoints: what each iteration writes, how a rerun reads them back, and the random
states that make a resumed run draw what the uninterrupted run would have drawn.

A checkpoint (``iter_<k>.pt``, format ``nepenthe.checkpoint/3``) holds the iteration's record, the
model's state (weights and masks, whole: an FSDP2 model's are gathered onto rank 0 to be written),
the statistics the next step prunes by, the EASIER replacements, every rank's random states (torch
CPU / CUDA, numpy, Python, and the ``rng_generators`` the caller passed) as they were when it was
written, and, for the iteration that stopped the loop, the reason. The file is the same whether one
process or an FSDP2 job wrote it, and either resumes from it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .. import distributed as ranks
from ..checkpoint import atomic_torch_save, payload_checksum, rng_state, set_rng_state
from ..entropy import EntropyStats
from ..errors import CheckpointError, PruneError
from ..sharded import full_state_dict
from .config import IterationRecord, PruneConfig
from .pruner import Pruner

__all__ = ["FORMAT", "checkpoint_path", "failure_stop_reason", "load_checkpoints", "model_state",
           "restore_random_states", "save_checkpoint", "stop_reason_of"]

FORMAT = "nepenthe.checkpoint/3"  # /3: random states and the stop reason; /2 files still resume


def checkpoint_path(directory: Path, iteration: int) -> Path:
    return directory / f"iter_{iteration:03d}.pt"


def _all_ranks_rng(generators) -> list[dict]:
    """Every rank's random states, in rank order (each rank draws its own dropout and shuffling)."""
    mine = rng_state(generators)
    if not ranks.is_active():
        return [mine]
    everyone: list = [None] * ranks.world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


def save_checkpoint(directory: Path, pruner: Pruner, record: IterationRecord, stats: EntropyStats,
                    config: PruneConfig, metric_scale: float, generators=(), stop_reason: str | None = None) -> None:
    """Rank 0 writes (every rank holds the same model, or its share of an FSDP2 one); the others wait
    for it to succeed or fail."""
    # collectives: every rank, before only rank 0 writes. FSDP2: the whole tensors are gathered onto
    # rank 0, so the file is that of a one-process run (and resumes with any number of ranks)
    model_state = full_state_dict(pruner.model)
    rng = _all_ranks_rng(generators)
    with ranks.agreed(f"writing checkpoint {checkpoint_path(directory, record.iteration)}"):
        if ranks.is_main():
            payload = {
                "format": FORMAT,
                "identity": config.identity(),
                "metric_scale": metric_scale,  # what evaluate's values were multiplied by (percent in the records)
                "record": record.to_dict(),
                "linearized": sorted(pruner.replaced),
                "model": model_state,
                "stats": stats.state_dict(),
                "rng": rng,
                "stop_reason": stop_reason,  # set on the iteration that stopped the loop
            }
            payload["checksum"] = payload_checksum(payload)  # tells a damaged file from a good one on resume
            atomic_torch_save(payload, checkpoint_path(directory, record.iteration))


def _read_checkpoint(path: Path) -> dict | str:
    """The checkpoint at ``path``, or why it cannot be used (unreadable, not ours, damaged)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated or damaged file, or one we did not write
        return f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if not isinstance(ckpt, dict) or not {"identity", "record", "model", "stats", "linearized"} <= set(ckpt):
        return "not a nepenthe checkpoint (keys missing)"
    if "checksum" in ckpt and ckpt["checksum"] != payload_checksum(ckpt):
        return "damaged: its checksum does not match its content"
    ckpt["path"] = path
    return ckpt


def load_checkpoints(directory: Path, config: PruneConfig) -> list[dict]:
    """The consecutive checkpoints a resume can use. A damaged one (and any after it) is set aside
    with a warning and the run resumes from the last good one; a good checkpoint of another run is
    refused (PruneError). Each one's model state is dropped (``"model"``: None) as soon as it was
    checked, so that reading N checkpoints holds one model state at a time: :func:`model_state` reads
    back those the resume needs (the last one, the selected one)."""
    found = sorted(directory.glob("iter_*.pt"))
    checkpoints = []
    for i, path in enumerate(found):
        ckpt = _read_checkpoint(path)
        if isinstance(ckpt, str):
            if i == 0:
                raise PruneError(f"checkpoint {path} cannot be used ({ckpt}); it holds the dense model, so there is "
                                 "nothing to resume from: use another checkpoint_dir or resume=False")
            later = [p.name for p in found[i + 1:]]
            warnings.warn(f"checkpoint {path.name} cannot be used ({ckpt}): resuming from iteration {i - 1} instead"
                          + (f" (ignoring {later})" if later else ""), RuntimeWarning, stacklevel=3)
            break
        if ckpt.get("identity") != config.identity():
            raise PruneError(f"checkpoint {path} was written with {ckpt.get('identity')}, but this run uses "
                             f"{config.identity()}; use another checkpoint_dir or resume=False.")
        if ckpt["record"]["iteration"] != i:
            raise PruneError(f"checkpoints in {directory} are not consecutive (missing iteration {i}); "
                             "use another checkpoint_dir or resume=False")
        ckpt["digest"], ckpt["model"] = _digest(ckpt), None
        checkpoints.append(ckpt)
    return checkpoints


def _digest(ckpt: dict) -> str:
    """What tells this file's content from any other: its checksum (a /2 file's computed)."""
    return ckpt.get("checksum") or payload_checksum({k: v for k, v in ckpt.items() if k != "path"})


def model_state(ckpt: dict) -> dict:
    """The model state of ``ckpt`` (one of :func:`load_checkpoints`'), read from its file again: the
    same content, or PruneError (the file was replaced or damaged since the resume read it)."""
    again = _read_checkpoint(ckpt["path"])
    if isinstance(again, str) or _digest(again) != ckpt["digest"]:
        why = again if isinstance(again, str) else "its content is not the one read before"
        raise PruneError(f"checkpoint {ckpt['path']} changed while the run was resuming from it ({why}); "
                         "is another run writing to this checkpoint_dir? Rerun to resume from the files as they are")
    return again["model"]


def stop_reason_of(ckpt: dict, record: IterationRecord) -> str:
    """Why the loop stopped at ``record`` (an iteration below tolerance or diverged): as the run that
    wrote it said, or, for a /2 checkpoint, rebuilt the same way from the record."""
    stored = ckpt.get("stop_reason")
    if stored is not None:
        if not isinstance(stored, str):
            raise CheckpointError(f"{ckpt['path']}: 'stop_reason' is {type(stored).__name__}, not text; delete the "
                                  "file to resume from the checkpoint before it, or start over (resume=False)")
        return stored
    return failure_stop_reason(record.failure or "accuracy fell below tolerance", len(record.backoffs))


def failure_stop_reason(failure: str, backoffs: int) -> str:
    """The stop reason of an iteration that failed (after ``backoffs`` failed attempts before it)."""
    return failure + (f" (after {backoffs} back-off(s))" if backoffs else "")


def restore_random_states(ckpt: dict, generators=()) -> None:
    """Set this rank's random states (and ``generators``') to those saved in ``ckpt``, so that the next
    phase draws what it drew in the uninterrupted run. A checkpoint without them (format /2) or
    written by another number of ranks resumes with a warning that it cannot be identical."""
    where = str(ckpt["path"])
    saved = ckpt.get("rng")
    if saved is None:
        warnings.warn(f"{where} holds no random states (written by an older nepenthe): the resumed run draws other "
                      "random numbers (shuffling, dropout) than an uninterrupted one would", RuntimeWarning,
                      stacklevel=3)
        return
    if not isinstance(saved, (list, tuple)) or not saved:
        raise CheckpointError(f"{where}: 'rng' is not a list of per-rank random states; delete the file to resume "
                              "from the checkpoint before it, or start over (resume=False)")
    if len(saved) != ranks.world_size():
        warnings.warn(f"{where} was written by {len(saved)} rank(s), this run has {ranks.world_size()}: random "
                      "states are not restored, so the resumed run draws other random numbers", RuntimeWarning,
                      stacklevel=3)
        return
    set_rng_state(saved[ranks.rank()], generators, where)
