"""A timm model as an embedding backbone (``timm:<model_name>``)."""
from __future__ import annotations

import torch
from torch import nn

from fr_distill.models import get_backbone
from .conftest import images


def test_timm_backbone_embeds():
    model = get_backbone("timm:test_resnet", 40, dropout=0.1).eval()
    with torch.no_grad():
        out = model(images(2))
    assert out.shape == (2, 40) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert isinstance(model.fc, nn.Linear) and isinstance(model.features, nn.BatchNorm1d)
    assert model.fc.in_features == model.trunk.num_features
