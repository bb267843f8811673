"""Reading a student out of an fr_distill checkpoint, and the verified ONNX export.

:func:`export_onnx` writes a model with a dynamic batch axis, input ``input`` [B,3,112,112]
and output ``embedding`` [B,D], and checks it with onnxruntime against the torch model; the
deployment files of ``fr-distill export`` (:mod:`fr_distill.deploy`) and the synthetic ONNX
teachers are written with it.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from torch import nn

from fr_distill.errors import FrDistillError
from fr_distill.models.errors import ModelLoadError
from fr_distill.models.onnx_teacher import ort_session
from fr_distill.config import ModelConfig
from fr_distill.models.weights import (checkpoint_model_config, is_fr_distill_checkpoint,
                                       load_strict, model_from_checkpoint, safe_torch_load,
                                       state_dict_of)

ONNX_OPSET = 18
VERIFY_BATCH = 3
VERIFY_RTOL = 1e-4


class ExportError(FrDistillError, RuntimeError):
    """The exported file does not reproduce the torch model (one-line message)."""

    exit_code = 1


def load_student(checkpoint_path: str) -> tuple[nn.Module, ModelConfig, int | None]:
    """The student of an fr_distill checkpoint (a step checkpoint or ``best.pt``), weights
    loaded strictly, in eval mode; with its ``config.model`` and the checkpoint's step."""
    payload = safe_torch_load(checkpoint_path)
    if not is_fr_distill_checkpoint(payload):
        raise ModelLoadError(f"{checkpoint_path} is not an fr_distill checkpoint "
                             "(no 'format': 'fr_distill' entry)")
    model, label = model_from_checkpoint(payload, checkpoint_path)
    load_strict(model, state_dict_of(payload["student"], checkpoint_path), checkpoint_path,
                label)
    return model.eval(), checkpoint_model_config(payload, checkpoint_path), payload.get("step")


def export_onnx(model: nn.Module, path: Path) -> float:
    """Export ``model`` to ONNX (dynamic batch) and verify it with onnxruntime; returns the
    relative error of the verification batch. Raises :class:`ExportError` above 1e-4."""
    example = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress lines
        torch.onnx.export(model, (example,), str(path), input_names=["input"],
                          output_names=["embedding"], opset_version=ONNX_OPSET,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
                          external_data=False)
    probe = torch.randn(VERIFY_BATCH, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(probe)
    actual = torch.from_numpy(ort_session(str(path), torch.device("cpu"))
                              .run(["embedding"], {"input": probe.numpy()})[0])
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    if not error <= VERIFY_RTOL:
        raise ExportError(f"{path}: onnxruntime output differs from the torch model by "
                          f"{error:.2e} relative (> {VERIFY_RTOL:g})")
    return error
