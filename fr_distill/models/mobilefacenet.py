"""MobileFaceNet, the second student family (METHOD §3), in the InsightFace arcface_torch layout.

The layout is arcface_torch's ``mbf`` (``backbones/mobilefacenet.py``, blocks (1, 4, 6, 2),
scale 2): a strided 3x3 stem, inverted-residual depthwise stages at 56/28/14/7 pixels, a 1x1
conv to 512 channels, and the global depthwise conv (GDC, 7x7) → Linear → BatchNorm1d
embedding. Module names match arcface_torch, so its published MobileFaceNet weights load
with ``strict=True``. ``width`` scales every channel count (1.0 is the published layout);
the body may run under autocast, the 1x1 conv and the GDC head always run in float32.
"""
from __future__ import annotations

import torch
from torch import nn

from fr_distill.models.layers import body_autocast, float32_head, scaled_channels

STAGE_BLOCKS = (4, 6, 2)  # residual blocks at 28, 14 and 7 pixels


class ConvBlock(nn.Module):
    """Conv (no bias) → BatchNorm2d → PReLU; ``prelu=False`` makes it a "linear" block."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1,
                 padding: int = 0, groups: int = 1, prelu: bool = True) -> None:
        super().__init__()
        layers = [nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
                  nn.BatchNorm2d(out_ch)]
        self.layers = nn.Sequential(*layers, *([nn.PReLU(out_ch)] if prelu else []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class InvertedResidual(nn.Module):
    """1x1 expand → 3x3 depthwise (strided) → 1x1 linear project, with identity shortcut
    when ``residual`` (arcface_torch's ``DepthWise``)."""

    def __init__(self, in_ch: int, out_ch: int, expanded: int, stride: int,
                 residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_ch, expanded),
            ConvBlock(expanded, expanded, kernel=3, stride=stride, padding=1, groups=expanded),
            ConvBlock(expanded, out_ch, prelu=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class ResidualStage(nn.Module):
    """``blocks`` stride-1 inverted residual blocks at constant width."""

    def __init__(self, channels: int, blocks: int, expanded: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(InvertedResidual(channels, channels, expanded, 1, True)
                                      for _ in range(blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDCHead(nn.Module):
    """Global depthwise conv (7x7, linear) → flatten → Linear (no bias) → BatchNorm1d(D)."""

    def __init__(self, channels: int, embedding_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            ConvBlock(channels, channels, kernel=7, groups=channels, prelu=False),
            nn.Flatten(),
            nn.Linear(channels, embedding_dim, bias=False),
            nn.BatchNorm1d(embedding_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet mapping [B,3,112,112] normalized images to [B,D] float32 embeddings."""

    def __init__(self, embedding_dim: int = 512, width: float = 1.0, fp16: bool = False) -> None:
        super().__init__()
        self.fp16 = fp16
        self.embedding_dim = embedding_dim
        c1, c2, c3 = (scaled_channels(c, width) for c in (128, 256, 512))
        self.layers = nn.ModuleList([
            ConvBlock(3, c1, kernel=3, stride=2, padding=1),
            ConvBlock(c1, c1, kernel=3, padding=1, groups=c1 // 2),
            InvertedResidual(c1, c1, expanded=c1, stride=2, residual=False),
            ResidualStage(c1, STAGE_BLOCKS[0], expanded=c1),
            InvertedResidual(c1, c2, expanded=c2, stride=2, residual=False),
            ResidualStage(c2, STAGE_BLOCKS[1], expanded=c2),
            InvertedResidual(c2, c2, expanded=c3, stride=2, residual=False),
            ResidualStage(c2, STAGE_BLOCKS[2], expanded=c2),
        ])
        self.conv_sep = ConvBlock(c2, c3)
        self.features = GDCHead(c3, embedding_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-normal (fan_out) convs and linears, BatchNorm weight 1 / bias 0."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.conv_sep(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with body_autocast(x, self.fp16):
            for layer in self.layers:
                x = layer(x)
        return float32_head(self._embed, x)
