"""ONNX teachers of both model-zoo input conventions, written from one trained embedding model.

InsightFace's ONNX files expect one of two inputs
(:func:`~fr_distill.models.onnx_teacher.input_convention`): arcface_torch exports take
``(pixels - 127.5) / 127.5``, the MXNet-era model-zoo graphs begin with their own ``Sub`` and
``Mul`` and take raw 0–255 pixels. :func:`write_onnx_teachers` writes one file of each kind
from the same model, so both loading paths — and the teacher check that catches a graph fed
the wrong input — can be exercised without downloads::

    out_dir/teacher_normalized.onnx   input (pixels - 127.5) / 127.5
    out_dir/teacher_raw_pixels.onnx   input raw 0-255 pixels, normalized by the graph itself

Both have a dynamic batch axis, input ``input`` [B,3,112,112] and output ``embedding`` [B,D]
(:func:`~fr_distill.models.export.export_onnx`, which checks each against the torch model in
onnxruntime). Each file is then loaded as a teacher is (:func:`load_frozen_model`) and must
be read with the convention it was written for and reproduce the source model's embeddings
of pipeline-normalized images (relative error ≤ 1e-4).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from fr_distill.models import ModelLoadError, load_frozen_model
from fr_distill.models.export import VERIFY_RTOL, ExportError, export_onnx
from fr_distill.models.onnx_teacher import PIPELINE_MEAN, PIPELINE_STD, input_convention

logger = logging.getLogger("fr_distill")

#: Written files by input convention; the keys are what :func:`write_onnx_teachers` returns.
TEACHER_FILES = {"normalized": "teacher_normalized.onnx", "raw_pixels": "teacher_raw_pixels.onnx"}
VERIFY_BATCH = 4


class RawPixelsInput(nn.Module):
    """A face model whose graph normalizes raw 0–255 pixels itself, as InsightFace's MXNet-era
    model-zoo ONNX files do: its export begins with ``Sub`` and ``Mul`` before the first
    ``Conv``, so a loader feeds it raw pixels."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - PIPELINE_MEAN) * (1 / PIPELINE_STD))


def load_exportable_model(path: str | os.PathLike, name: str = "iresnet100",
                          embedding_dim: int = 512, width: float = 1.0) -> nn.Module:
    """The torch model of a weights file (an fr_distill checkpoint, or a state dict of
    ``name``/``embedding_dim``/``width``), in eval mode. TorchScript and ONNX files are refused
    with a :class:`ModelLoadError`: the ONNX exporter cannot trace the modules they load as."""
    teacher = load_frozen_model(str(path), name, embedding_dim, width)
    if teacher.backend != "torch":
        raise ModelLoadError(f"{path}: a {teacher.backend} model cannot be exported to ONNX "
                             "again; give an fr_distill checkpoint or a state dict")
    return teacher.model


def _pipeline_images(batch: int) -> torch.Tensor:
    """Random 0–255 pixel images as the pipeline feeds them: ``(pixels - 127.5) / 127.5``."""
    pixels = torch.randint(0, 256, (batch, 3, 112, 112), generator=torch.Generator().manual_seed(0))
    return (pixels.float() - PIPELINE_MEAN) / PIPELINE_STD


def _verify(path: Path, expected_mean: float, expected_std: float, probe: torch.Tensor,
            expected: torch.Tensor) -> float:
    """Check that ``path`` is read with the intended input convention and that, loaded as a
    teacher, it reproduces ``expected`` on ``probe``; returns the relative error."""
    import onnx

    mean, std, _ = input_convention(onnx.load(str(path)))
    if (mean, std) != (expected_mean, expected_std):
        raise ExportError(f"{path}: written for input (pixels - {expected_mean:g}) / "
                          f"{expected_std:g} but read as taking (pixels - {mean:g}) / {std:g}")
    actual = load_frozen_model(str(path))(probe)
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    if not error <= VERIFY_RTOL:
        raise ExportError(f"{path}: loaded as a teacher, its embeddings differ from the source "
                          f"model's by {error:.2e} relative (> {VERIFY_RTOL:g})")
    return error


def write_onnx_teachers(source: nn.Module | str | os.PathLike, out_dir: str | os.PathLike, *,
                        name: str = "iresnet100", embedding_dim: int = 512,
                        width: float = 1.0) -> dict[str, Path]:
    """Write ``teacher_normalized.onnx`` and ``teacher_raw_pixels.onnx`` of ``source`` into
    ``out_dir`` and verify both (see the module docstring); returns ``{"normalized": path,
    "raw_pixels": path}``.

    ``source`` is a CPU embedding model taking ``(pixels - 127.5) / 127.5`` (set to eval mode
    here), or a weights file read by :func:`load_exportable_model` with ``name``,
    ``embedding_dim`` and ``width`` (which describe a plain state dict only). Raises
    :class:`ModelLoadError` for an unreadable file and :class:`ExportError` when a written file
    fails its verification."""
    if isinstance(source, (str, os.PathLike)):
        model = load_exportable_model(source, name, embedding_dim, width)
    else:
        model = source.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    probe = _pipeline_images(VERIFY_BATCH)
    with torch.no_grad():
        expected = model(probe)
    variants = {"normalized": (model, PIPELINE_MEAN, PIPELINE_STD),
                "raw_pixels": (RawPixelsInput(model).eval(), 0.0, 1.0)}
    written = {}
    for kind, (module, mean, std) in variants.items():
        written[kind] = out / TEACHER_FILES[kind]
        export_onnx(module, written[kind])
        error = _verify(written[kind], mean, std, probe, expected)
        logger.info("wrote %s: input (pixels - %g) / %g, loaded as a teacher it reproduces the "
                    "source model (relative error %.1e)", written[kind], mean, std, error)
    return written
