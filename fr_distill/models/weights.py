"""Reading weight files safely: ``torch.load(weights_only=True)``, state-dict extraction, and
strict loading whose failure names the missing/unexpected keys and shape mismatches.

Shared by teacher loading, student export and the student's ``model.init`` (strict but for
the names ``model.init_skip`` leaves at their fresh initialization). Every failure is a
one-line :class:`ModelLoadError` naming the file.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

from fr_distill.backbones import IRESNET_LAYERS
from fr_distill.checkpoint import files as checkpoint
from fr_distill.config import ConfigError, ModelConfig, from_dict
from fr_distill.models.errors import ModelLoadError
from fr_distill.models.iresnet import STEM_CHANNELS
from fr_distill.models.registry import build_student
from fr_distill.unpickling import refusal

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
LISTED_KEYS = 5


def is_fr_distill_checkpoint(payload: object) -> bool:
    """Whether ``payload`` is an fr_distill training checkpoint dict."""
    return isinstance(payload, dict) and payload.get("format") == "fr_distill"


def safe_torch_load(path: str) -> object:
    """``torch.load(weights_only=True)`` with one-line :class:`ModelLoadError` failures; a
    sharded checkpoint directory (``checkpoint.format=dcp``) is verified and read whole."""
    if os.path.isdir(path):
        try:
            return checkpoint.load(path)
        except checkpoint.CheckpointError as err:
            raise ModelLoadError(str(err)) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, LookupError) as err:
        # bytes of another format read as pickle opcodes may fail a memo or stack lookup
        # (KeyError, IndexError: e.g. a text file starting with "h")
        refused = refusal(err, path)
        if refused:
            raise ModelLoadError(f"{refused} (save a state_dict instead)") from None
        raise ModelLoadError(f"cannot read {path}: not a torch.save file (truncated, corrupt, or "
                             f"another format such as ONNX)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read {path} (truncated or corrupt?): "
                             f"{str(err).strip().splitlines()[0][:200]}") from None


def checkpoint_model_config(checkpoint: dict, path: str) -> ModelConfig:
    """The student's ``config["model"]`` recorded in an fr_distill checkpoint."""
    missing = [key for key in ("config", "student") if key not in checkpoint]
    if missing or not isinstance(checkpoint["config"], dict) or "model" not in checkpoint["config"]:
        raise ModelLoadError(f"fr_distill checkpoint {path} lacks "
                             f"{', '.join(missing) or 'config.model'}")
    try:
        return from_dict({"model": checkpoint["config"]["model"]}, source=path).model
    except ConfigError as err:
        raise ModelLoadError(f"fr_distill checkpoint {path}: {err}") from None


def architecture(model_cfg: ModelConfig) -> str:
    """``iresnet18 (width 1.0, embedding_dim 512)``: what a student config builds."""
    return f"{model_cfg.name} (width {model_cfg.width}, embedding_dim {model_cfg.embedding_dim})"


def model_from_checkpoint(checkpoint: dict, path: str) -> tuple[nn.Module, str]:
    """The student architecture recorded in an fr_distill checkpoint's ``config["model"]``."""
    model_cfg = checkpoint_model_config(checkpoint, path)
    model = build_student(model_cfg.name, model_cfg.embedding_dim, model_cfg.width,
                          model_cfg.dropout)
    return model, f"checkpoint model {architecture(model_cfg)}"


def state_dict_of(payload: object, path: str) -> dict[str, torch.Tensor]:
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


def _matches(key: str, patterns: Sequence[str]) -> bool:
    """Whether the state-dict name ``key`` matches one of the fnmatch ``patterns``."""
    return any(fnmatchcase(key, pattern) for pattern in patterns)


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: str, label: str,
                skip: Sequence[str] = ()) -> list[str]:
    """``model.load_state_dict(state, strict=True)`` after a check whose failure is one line
    listing the first missing keys, unexpected keys and shape mismatches.

    Names matching a ``skip`` pattern (fnmatch) are left out on both sides: the model keeps
    its own values for them and the file's are not read. Returns the model's skipped names.
    """
    expected = model.state_dict()
    skipped = [key for key in expected if _matches(key, skip)]
    expected = {key: value for key, value in expected.items() if key not in skipped}
    state = {key: value for key, value in state.items() if not _matches(key, skip)}
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
    # the check above is the strict one: only the skipped names are absent from ``state``
    model.load_state_dict(state, strict=not skipped)
    return skipped


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


def read_init_weights(path: str, model_cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a ``model.init`` file and what the file is (for the log).

    An fr_distill checkpoint (a run's ``step_*.pt`` or ``best.pt``) must record the backbone
    and width of ``model_cfg`` (its embedding size may differ where ``model.init_skip`` leaves
    the embedding layers fresh; the strict load checks every shape); any other file is read as
    an InsightFace state dict (:func:`state_dict_of`). Read before the run directory is
    claimed, so a checkpoint of that directory is read before a fresh start moves it aside.
    """
    try:
        payload = safe_torch_load(path)
        if not is_fr_distill_checkpoint(payload):
            return state_dict_of(payload, path), "state dict"
        recorded = checkpoint_model_config(payload, path)
        if (recorded.name, recorded.width) != (model_cfg.name, model_cfg.width):
            raise ModelLoadError(f"{path} is a checkpoint of {architecture(recorded)}, the "
                                 f"student is {architecture(model_cfg)}: the backbone and width "
                                 f"must be the same")
        return (state_dict_of(payload["student"], path),
                f"fr_distill checkpoint of step {payload.get('step', '?')}")
    except ModelLoadError as err:
        raise ModelLoadError(f"model.init: {err}") from None


def load_init_weights(student: nn.Module, state: dict[str, torch.Tensor], path: str,
                      model_cfg: ModelConfig) -> list[str]:
    """Load the ``model.init`` tensors ``state`` (of ``path``) into a freshly built ``student``
    strictly but for the names ``model.init_skip`` matches; returns those names.

    Draws no random numbers: the rest of the run (the head built next, the data order) starts
    as it would without ``model.init``.
    """
    label = f"the student {architecture(model_cfg)}"
    unused = [pattern for pattern in model_cfg.init_skip
              if not any(fnmatchcase(key, pattern) for key in (*student.state_dict(), *state))]
    if unused:
        raise ModelLoadError(f"model.init_skip pattern(s) {', '.join(map(repr, unused))} match no "
                             f"name of {label} or of {path}")
    try:
        return load_strict(student, state, path, label, model_cfg.init_skip)
    except ModelLoadError as err:
        raise ModelLoadError(f"model.init: {err}") from None
