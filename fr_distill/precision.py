"""Mixed precision and image layout: the one map from an amp setting to an autocast dtype,
the autocast context, and the memory format of the images a model sees.

``precision.amp`` in a config, ``--amp`` of the evaluation and benchmark commands all go
through :func:`amp_dtype`: ``bf16`` and ``fp16`` autocast to that dtype, ``fp32`` (or its
alias ``off``) runs in float32 with autocast disabled — on every device, evaluation included.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

AMP_CHOICES = ("bf16", "fp16", "fp32", "off")


def amp_dtype(amp: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device``; ``None`` means float32 without autocast.

    bf16 on a CUDA device without bf16 support falls back to float32, with a warning.
    """
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    device = torch.device(device)
    if amp in ("fp32", "off"):
        return None
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("amp bf16 is not supported on %s; running in fp32",
                    torch.cuda.get_device_name(device))
        return None
    return torch.bfloat16


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to ``dtype`` on ``device``'s type; disabled for ``None`` (float32)."""
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32,
                          enabled=dtype is not None)


def image_layout(channels_last: bool, device: torch.device) -> torch.memory_format:
    """channels_last (``model.channels_last``) on CUDA, where its convolutions are faster.

    On the CPU, torch 2.14.1's channels_last IResNet backward corrupts the heap (``free():
    invalid next size``), and CPU kernels gain nothing from it, so the CPU keeps NCHW.
    """
    if channels_last and device.type == "cuda":
        return torch.channels_last
    return torch.contiguous_format
