"""Helpers of the backbone tests: a backbone built on the meta device, seeded input images."""
from __future__ import annotations

import torch
from torch import nn

from fr_distill.models import get_backbone


def on_meta(name: str, dim: int = 512, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return get_backbone(name, dim, **kwargs)


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(seed))
