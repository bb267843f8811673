"""Reading weight files safely: ``torch.load(weights_only=True)``, state-dict extraction, and
strict loading whose failure names the missing/unexpected keys and shape mismatches.

Shared by teacher loading and student export. Every failure is a one-line
:class:`ModelLoadError` naming the file.
"""
from __future__ import annotations

import pickle
import re

import torch
from torch import nn

from fr_distill.config import ConfigError, from_dict
from fr_distill.models.errors import ModelLoadError
from fr_distill.models.iresnet import IRESNET_LAYERS, STEM_CHANNELS
from fr_distill.models.registry import build_student

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
LISTED_KEYS = 5


def is_fr_distill_checkpoint(payload: object) -> bool:
    """Whether ``payload`` is an fr_distill training checkpoint dict."""
    return isinstance(payload, dict) and payload.get("format") == "fr_distill"


def safe_torch_load(path: str) -> object:
    """``torch.load(weights_only=True)`` with one-line :class:`ModelLoadError` failures."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch < 2.6: "Unsupported global: GLOBAL x.y"; torch 2.14: "unsupported GLOBAL x.y
        # whose module x is blocked" (or "... was not an allowed global")
        match = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(err))
        if match:
            raise ModelLoadError(f"refusing to unpickle code from {path}: it references "
                                 f"{match.group(1)} (save a state_dict instead)") from None
        raise ModelLoadError(f"cannot read {path}: not a torch.save file (truncated, corrupt, or "
                             f"another format such as ONNX)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read {path} (truncated or corrupt?): "
                             f"{str(err).strip().splitlines()[0][:200]}") from None


def model_from_checkpoint(checkpoint: dict, path: str) -> tuple[nn.Module, str]:
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
