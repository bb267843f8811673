"""Any timm model as an embedding backbone: ``timm:<model_name>`` in the registry.

The timm trunk is built without its classifier (``num_classes=0`` gives pooled features) and
followed by the face-recognition embedding head used by IResNet: Linear → BatchNorm1d(D),
run in float32. This is how the paper's DPN-98 teacher-gap experiment is expressed
(``timm:dpn98``). Weights come from fr_distill checkpoints or state dicts, never downloads.
"""
from __future__ import annotations

import torch
from torch import nn

from fr_distill.models.errors import ModelLoadError
from fr_distill.models.layers import body_autocast, float32_head


class TimmBackbone(nn.Module):
    """A timm trunk (pooled features) followed by a Linear → BatchNorm1d(D) embedding head."""

    def __init__(self, model_name: str, embedding_dim: int = 512, dropout: float = 0.0,
                 fp16: bool = False, **timm_kwargs) -> None:
        super().__init__()
        import timm

        if not timm.is_model(model_name):
            close = timm.list_models(f"*{model_name}*")[:8]
            raise ModelLoadError(f"unknown timm model {model_name!r}"
                                 + (f"; similar: {', '.join(close)}" if close else ""))
        self.fp16 = fp16
        self.embedding_dim = embedding_dim
        self.trunk = timm.create_model(model_name, pretrained=False, num_classes=0,
                                       drop_rate=dropout, **timm_kwargs)
        self.fc = nn.Linear(self.trunk.num_features, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with body_autocast(x, self.fp16):
            x = self.trunk(x)
        return float32_head(self._embed, x)
