"""Small building blocks shared by the backbones: channel scaling and the float32 head.

Both backbone families end in an embedding head (``Linear`` → ``BatchNorm1d``) that must run
in float32 even when the body runs under ``torch.autocast`` (METHOD §3: "the final FC in
float32"), and both accept a ``width`` multiplier so tests and demos can build tiny members
of the same family.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def scaled_channels(channels: int, width: float) -> int:
    """``channels * width`` rounded to a multiple of 8 (at least 8); width 1.0 is exact."""
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    return max(8, int(channels * width / 8 + 0.5) * 8)


def body_autocast(x: torch.Tensor, fp16: bool) -> contextlib.AbstractContextManager:
    """The autocast context for a backbone body: float16 autocast when ``fp16`` is set.

    Without ``fp16`` nothing is entered, so an autocast context opened by the caller
    (e.g. the trainer's bf16 region) stays in effect.
    """
    if fp16:
        return torch.autocast(device_type=x.device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def float32_head(head: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Run ``head`` in float32 with autocast disabled, whatever the caller's autocast state."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return head(x.float())
