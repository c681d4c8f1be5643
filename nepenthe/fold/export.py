"""Export a (folded) model to ONNX.

``torch.export.export(folded, (x,))`` needs no helper: folded models are plain
``torch.fx.GraphModule``s of standard ops. ONNX needs the ``onnx`` and ``onnxscript`` packages
(optional; ``pip install onnx onnxscript``), which :func:`export_onnx` checks for first.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["export_onnx"]


def export_onnx(model: nn.Module, example_input, path: str | Path, *, dynamic_batch: bool = False,
                opset_version: int | None = None, check: bool = True) -> Path:
    """Write ``model`` (run in eval mode, on ``example_input``: a tensor or a tuple of inputs) as
    an ONNX file at ``path`` and return the path.

    ``dynamic_batch=True`` makes dimension 0 of every input symbolic (the model must not bake
    the batch size into a reshape). ``opset_version`` defaults to the exporter's.
    ``check=True`` runs ``onnx.checker`` on the result. Raises ``ImportError`` saying what to
    install when ``onnx`` / ``onnxscript`` are missing.
    """
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter's backend; imported here for a clear error)
    except ImportError as exc:
        raise ImportError(f"export_onnx needs the optional packages onnx and onnxscript ({exc}); "
                          "install them with `pip install onnx onnxscript`") from exc
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if isinstance(a, torch.Tensor) else None for a in args)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch's own exporter trips over its pytree deprecation (torch 2.13); nothing to act on
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            # The torch.export-based ("dynamo") exporter: the default since torch 2.9 and the one
            # maintained; the TorchScript one is deprecated. It exports the folded models here
            # (fx GraphModules of aten-level ops) without custom symbolics; it needs onnxscript.
            torch.onnx.export(model, args, str(path), dynamo=True, verbose=False, opset_version=opset_version,
                              dynamic_shapes=dynamic_shapes, external_data=False)
    finally:
        model.train(was_training)
    if check:
        onnx.checker.check_model(str(path))
    return path
