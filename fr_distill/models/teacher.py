"""Loading the frozen teacher from any of the formats face-recognition models ship in.

Accepted files (detected from their content, not their name):

- an InsightFace state dict (``backbone.pth`` / ``model.pt``, optionally with a ``module.``
  prefix, or an arcface_torch training checkpoint holding ``state_dict_backbone``), loaded
  strictly into ``get_backbone(name, embedding_dim, width=width)``;
- an fr_distill checkpoint (``{"format": "fr_distill", "config": ..., "student": ...}``): the
  architecture comes from its ``config["model"]``, the weights from ``student``;
- an ONNX model (see :mod:`fr_distill.models.onnx_teacher`);
- a TorchScript archive (``torch.jit.save``).

Pickled weights are read with ``torch.load(weights_only=True)`` only: a file that carries
code is refused. The result is a :class:`FrozenTeacher`: eval mode that ``train()`` cannot
undo, no parameter requiring grad, forward under ``no_grad`` returning float32 [B,D].
"""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import torch
from torch import nn

from fr_distill.models.errors import ModelLoadError
from fr_distill.models.onnx_teacher import (ONNX_BACKENDS, PIPELINE_MEAN, PIPELINE_STD,
                                            InputNormalization, load_onnx_teacher)
from fr_distill.models.registry import get_backbone
from fr_distill.models.weights import (is_fr_distill_checkpoint, load_strict,
                                       model_from_checkpoint, safe_torch_load, state_dict_of)
from fr_distill.precision import autocast

logger = logging.getLogger("fr_distill")

PICKLE_MAGIC = b"\x80"
ZIP_MAGIC = b"PK\x03\x04"


class FrozenTeacher(nn.Module):
    """A teacher that stays frozen: eval mode (``train()`` is a no-op), no gradients, and a
    forward under ``no_grad`` returning float32 embeddings on the input's device."""

    def __init__(self, model: nn.Module, source: str, backend: str, embedding_dim: int,
                 built_from_keys: bool = False) -> None:
        super().__init__()
        self.model = model
        self.source = source
        self.backend = backend  # "torch", "torchscript", "onnx2torch" or "onnxruntime"
        self.embedding_dim = embedding_dim
        #: a plain state dict, whose architecture came from the name/embedding_dim/width given
        self.built_from_keys = built_from_keys
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Ignored: the teacher stays in eval mode (BatchNorm statistics never update)."""
        return self

    def requires_grad_(self, requires_grad: bool = True) -> FrozenTeacher:
        """Refuses to make the teacher trainable; ``requires_grad_(False)`` is accepted."""
        if requires_grad:
            raise RuntimeError(f"the teacher loaded from {self.source} is frozen")
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x).float()


def load_frozen_model(path: str, name: str = "iresnet100", embedding_dim: int = 512,
                 width: float = 1.0, device: str | torch.device = "cpu",
                 onnx_backend: str = "auto", input_mean: float | None = None,
                 input_std: float | None = None) -> FrozenTeacher:
    """Load a frozen embedding model from ``path`` (state dict, fr_distill checkpoint, ONNX or
    TorchScript): the teacher of a run, or any model to evaluate. ``name``/``embedding_dim``/``width`` describe the architecture of a plain
    state dict; checkpoints carry their own, ONNX and TorchScript files are self-describing.
    Raises :class:`ModelLoadError` (one line naming the file and the offending keys).

    Input: the pipeline feeds ``(pixels - 127.5) / 127.5``. An ONNX graph that normalizes its
    input itself gets raw pixels instead (:func:`~fr_distill.models.onnx_teacher.input_convention`);
    ``input_mean``/``input_std`` (``teacher.input_mean``/``teacher.input_std``) override the
    choice for any model. The log says which input was used and why."""
    if onnx_backend not in ONNX_BACKENDS:
        raise ModelLoadError(f"onnx_backend must be one of {', '.join(ONNX_BACKENDS)}, "
                             f"got {onnx_backend!r}")
    file = Path(path)
    if not file.is_file() and not file.is_dir():  # a directory: a sharded checkpoint
        raise ModelLoadError(f"model file not found: {path}")
    device = torch.device(device)
    head = file.read_bytes()[:4] if file.is_file() and file.stat().st_size else b""
    convention = None  # (mean, std, reason) an ONNX graph expects
    built_from_keys = False
    if head.startswith(ZIP_MAGIC) and _is_torchscript(file):
        module, backend, dim = _load_torchscript(path, device)
    elif head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC) or file.is_dir():
        module, backend, dim, built_from_keys = _load_pickled_weights(path, name, embedding_dim,
                                                                      width, device)
    else:
        module, backend, dim, convention = load_onnx_teacher(path, device, onnx_backend)
    if input_mean is not None or input_std is not None:
        convention = (PIPELINE_MEAN if input_mean is None else input_mean,
                      PIPELINE_STD if input_std is None else input_std,
                      "set by teacher.input_mean/teacher.input_std")
    mean, std = convention[:2] if convention else (PIPELINE_MEAN, PIPELINE_STD)
    if convention:
        logger.info("teacher %s: input (pixels - %g) / %g: %s", path, mean, std, convention[2])
    if (mean, std) != (PIPELINE_MEAN, PIPELINE_STD):
        module = InputNormalization(module, mean, std)
    teacher = FrozenTeacher(module, str(path), backend, dim, built_from_keys)
    logger.info("teacher %s loaded via %s, embedding dim %d, on %s", path, backend, dim, device)
    return teacher


def _is_torchscript(file: Path) -> bool:
    """TorchScript archives hold ``<archive>/constants.pkl``; ``torch.save`` files do not."""
    try:
        with zipfile.ZipFile(file) as archive:
            return any(n.endswith("/constants.pkl") for n in archive.namelist())
    except zipfile.BadZipFile:
        return False


def _load_torchscript(path: str, device: torch.device) -> tuple[nn.Module, str, int]:
    try:
        module = torch.jit.load(path, map_location=device).eval()
        with torch.no_grad():
            probe = module(torch.zeros(2, 3, 112, 112, device=device))
    except Exception as err:  # TorchScript raises RuntimeError / torch.jit.Error
        raise ModelLoadError(f"cannot run TorchScript teacher {path} on a [2,3,112,112] "
                             f"batch: {str(err).strip().splitlines()[0][:300]}") from None
    if probe.ndim != 2:
        raise ModelLoadError(f"TorchScript teacher {path} returns shape {tuple(probe.shape)}, "
                             "expected [B,D]")
    logger.info("teacher %s: TorchScript module", path)
    return module, "torchscript", probe.shape[1]


def _load_pickled_weights(path: str, name: str, embedding_dim: int, width: float,
                          device: torch.device) -> tuple[nn.Module, str, int, bool]:
    """(model, backend, embedding dim, whether the architecture came from the keys given)."""
    payload = safe_torch_load(path)
    if is_fr_distill_checkpoint(payload):
        model, label = model_from_checkpoint(payload, path)
        kind, weights = "fr_distill checkpoint", state_dict_of(payload["student"], path)
    else:
        model = get_backbone(name, embedding_dim, width=width)
        label = f"{name} (width {width}, embedding_dim {embedding_dim})"
        kind, weights = "state dict", state_dict_of(payload, path)
    load_strict(model, weights, path, label)
    logger.info("teacher %s: %s loaded strictly into %s", path, kind, label)
    return model.to(device), "torch", model.embedding_dim, kind == "state dict"


def teacher_embeddings(teacher: nn.Module, images: torch.Tensor, device: torch.device,
                       amp_dtype: torch.dtype | None) -> torch.Tensor:
    """A frozen teacher's float32 embeddings of ``images`` (``no_grad``, autocast): the one
    teacher forward of training and of the teacher-embedding cache's build."""
    with torch.no_grad(), autocast(device, amp_dtype):
        return teacher(images).float()
