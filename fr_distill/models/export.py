"""Exporting a trained student from an fr_distill checkpoint for deployment.

``backbone.pth`` is the student's plain state dict — for IResNet and MobileFaceNet students
exactly InsightFace arcface_torch's layout, so InsightFace tooling loads it with
``strict=True``. ``backbone.onnx`` (optional) has a dynamic batch axis, input ``input``
[B,3,112,112] and output ``embedding`` [B,D]; it is verified with onnxruntime against the
torch model before the export is reported as done.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import torch
from torch import nn

from fr_distill.errors import FrDistillError
from fr_distill.models.errors import ModelLoadError
from fr_distill.models.onnx_teacher import ort_session
from fr_distill.models.weights import (is_fr_distill_checkpoint, load_strict,
                                       model_from_checkpoint, safe_torch_load, state_dict_of)

logger = logging.getLogger("fr_distill")

ONNX_OPSET = 18
VERIFY_BATCH = 3
VERIFY_RTOL = 1e-4


class ExportError(FrDistillError, RuntimeError):
    """The exported file does not reproduce the torch model (one-line message)."""

    exit_code = 1


def load_student(checkpoint_path: str) -> nn.Module:
    """The student of an fr_distill checkpoint, weights loaded strictly, in eval mode."""
    payload = safe_torch_load(checkpoint_path)
    if not is_fr_distill_checkpoint(payload):
        raise ModelLoadError(f"{checkpoint_path} is not an fr_distill checkpoint "
                             "(no 'format': 'fr_distill' entry)")
    model, label = model_from_checkpoint(payload, checkpoint_path)
    load_strict(model, state_dict_of(payload["student"], checkpoint_path), checkpoint_path,
                label)
    return model.eval()


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


def export_student(checkpoint_path: str, out_dir: str, onnx: bool = False) -> dict[str, str]:
    """Write ``backbone.pth`` (and with ``onnx`` a verified ``backbone.onnx``) for the student
    of ``checkpoint_path`` into ``out_dir``; returns file kind → written path."""
    model = load_student(checkpoint_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"state_dict": str(out / "backbone.pth")}
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    torch.save(state, written["state_dict"])
    logger.info("wrote %s (%d tensors)", written["state_dict"], len(state))
    if onnx:
        written["onnx"] = str(out / "backbone.onnx")
        error = export_onnx(model, Path(written["onnx"]))
        logger.info("wrote %s (onnxruntime vs torch relative error %.1e)", written["onnx"], error)
    return written
