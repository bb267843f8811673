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
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from fr_distill.config import ConfigError, from_dict
from fr_distill.models.errors import ModelLoadError
from fr_distill.models.iresnet import IRESNET_LAYERS, STEM_CHANNELS
from fr_distill.models.onnx_teacher import ONNX_BACKENDS, load_onnx_teacher
from fr_distill.models.registry import build_student, get_backbone

logger = logging.getLogger("fr_distill")

PICKLE_MAGIC = b"\x80"
ZIP_MAGIC = b"PK\x03\x04"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
LISTED_KEYS = 5


class FrozenTeacher(nn.Module):
    """A teacher that stays frozen: eval mode (``train()`` is a no-op), no gradients, and a
    forward under ``no_grad`` returning float32 embeddings on the input's device."""

    def __init__(self, model: nn.Module, source: str, backend: str, embedding_dim: int) -> None:
        super().__init__()
        self.model = model
        self.source = source
        self.backend = backend  # "torch", "torchscript", "onnx2torch" or "onnxruntime"
        self.embedding_dim = embedding_dim
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Ignored: the teacher stays in eval mode (BatchNorm statistics never update)."""
        return self

    def requires_grad_(self, requires_grad: bool = True) -> FrozenTeacher:
        if requires_grad:
            raise RuntimeError(f"the teacher loaded from {self.source} is frozen")
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x).float()


def load_teacher(path: str, name: str = "iresnet100", embedding_dim: int = 512,
                 width: float = 1.0, device: str | torch.device = "cpu",
                 onnx_backend: str = "auto") -> FrozenTeacher:
    """Load a frozen teacher from ``path`` (state dict, fr_distill checkpoint, ONNX or
    TorchScript). ``name``/``embedding_dim``/``width`` describe the architecture of a plain
    state dict; checkpoints carry their own, ONNX and TorchScript files are self-describing.
    Raises :class:`ModelLoadError` (one line naming the file and the offending keys)."""
    if onnx_backend not in ONNX_BACKENDS:
        raise ModelLoadError(f"onnx_backend must be one of {', '.join(ONNX_BACKENDS)}, "
                             f"got {onnx_backend!r}")
    file = Path(path)
    if not file.is_file():
        raise ModelLoadError(f"teacher file not found: {path}")
    device = torch.device(device)
    head = file.read_bytes()[:4] if file.stat().st_size else b""
    if head.startswith(ZIP_MAGIC) and _is_torchscript(file):
        module, backend, dim = _load_torchscript(path, device)
    elif head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC):
        module, backend, dim = _load_pickled_weights(path, name, embedding_dim, width, device)
    else:
        module, backend, dim = load_onnx_teacher(path, device, onnx_backend)
    teacher = FrozenTeacher(module, str(path), backend, dim)
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


def safe_torch_load(path: str) -> object:
    """``torch.load(weights_only=True)`` with one-line :class:`ModelLoadError` failures."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        match = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        reason = (f"it references {match.group(1)} (save a state_dict instead)" if match
                  else str(err).strip().splitlines()[-1][:200])
        raise ModelLoadError(f"refusing to unpickle code from {path}: {reason}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read {path} (truncated or corrupt?): "
                             f"{str(err).strip().splitlines()[0][:200]}") from None


def _load_pickled_weights(path: str, name: str, embedding_dim: int, width: float,
                          device: torch.device) -> tuple[nn.Module, str, int]:
    payload = safe_torch_load(path)
    if isinstance(payload, dict) and payload.get("format") == "fr_distill":
        model, label = _model_from_checkpoint(payload, path)
        kind, weights = "fr_distill checkpoint", _state_dict_of(payload["student"], path)
    else:
        model = get_backbone(name, embedding_dim, width=width)
        label = f"{name} (width {width}, embedding_dim {embedding_dim})"
        kind, weights = "state dict", _state_dict_of(payload, path)
    load_strict(model, weights, path, label)
    logger.info("teacher %s: %s loaded strictly into %s", path, kind, label)
    return model.to(device), "torch", model.embedding_dim


def _model_from_checkpoint(checkpoint: dict, path: str) -> tuple[nn.Module, str]:
    """The student architecture recorded in an fr_distill checkpoint's ``config["model"]``."""
    missing = [key for key in ("config", "student") if key not in checkpoint]
    if missing or not isinstance(checkpoint["config"], dict) or "model" not in checkpoint["config"]:
        raise ModelLoadError(f"fr_distill checkpoint {path} lacks "
                             f"{', '.join(missing) or 'config.model'}")
    try:
        model_cfg = from_dict({"model": checkpoint["config"]["model"]}, source=path).model
    except ConfigError as err:
        raise ModelLoadError(f"fr_distill checkpoint {path}: {err}") from None
    label = (f"checkpoint model {model_cfg.name} (width {model_cfg.width}, "
             f"embedding_dim {model_cfg.embedding_dim})")
    return build_student(model_cfg), label


def _state_dict_of(payload: object, path: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside an InsightFace file, without DDP/compile key prefixes."""
    if isinstance(payload, dict) and isinstance(payload.get("state_dict_backbone"), dict):
        payload = payload["state_dict_backbone"]  # arcface_torch training checkpoint
    if not isinstance(payload, dict) or not payload \
            or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        keys = list(payload)[:LISTED_KEYS] if isinstance(payload, dict) else type(payload).__name__
        raise ModelLoadError(f"{path} holds no state dict of tensors (found {keys})")
    state = dict(payload)
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def _listed(keys: list[str]) -> str:
    more = f" (+{len(keys) - LISTED_KEYS} more)" if len(keys) > LISTED_KEYS else ""
    return ", ".join(keys[:LISTED_KEYS]) + more


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: str, label: str) -> None:
    """``model.load_state_dict(state, strict=True)`` after a check whose failure is one line
    listing the first missing keys, unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}"
                  for key, value in expected.items()
                  if key in state and state[key].shape != value.shape]
    problems = [f"{what} [{_listed(keys)}]" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected),
                 ("shape mismatches (file vs model)", mismatched)) if keys]
    if problems:
        hint = describe_iresnet_state(state)
        raise ModelLoadError(f"{path} does not fit {label}: " + "; ".join(problems)
                             + (f"; the file looks like {hint}" if hint else ""))
    model.load_state_dict(state, strict=True)


def describe_iresnet_state(state: dict[str, torch.Tensor]) -> str | None:
    """Name the IResNet (depth, width, embedding dim) an InsightFace state dict holds, if any."""
    blocks = tuple(len({key.split(".")[1] for key in state
                        if key.startswith(f"layer{stage}.") and key.endswith(".conv1.weight")})
                   for stage in range(1, 5))
    depth = next((d for d, layers in IRESNET_LAYERS.items() if layers == blocks), None)
    if depth is None or "conv1.weight" not in state or "fc.weight" not in state:
        return None
    width = state["conv1.weight"].shape[0] / STEM_CHANNELS
    return f"iresnet{depth} (width {width:g}, embedding_dim {state['fc.weight'].shape[0]})"
