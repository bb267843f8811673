"""IResNet-18/34/50/100/200 in the InsightFace arcface_torch layout (METHOD §3).

Module names, parameter/buffer names and tensor shapes equal those of arcface_torch's
``backbones/iresnet.py``, so a published InsightFace ``backbone.pth`` loads with
``strict=True`` and computes the same embedding:

    conv1(3x3, 64) → bn1 → prelu → layer1..layer4 (IBasicBlock, channels 64/128/256/512,
    first block of each layer strides by 2 and has downsample = conv1x1 + BN)
    → bn2 → flatten → dropout → fc(512·7·7 → D) → features (BatchNorm1d, weight fixed at 1)

The body may run under ``torch.autocast`` (``fp16=True`` opens a float16 region itself);
``fc`` and ``features`` always run in float32. ``width`` scales every channel count
(1.0 is the published layout) so tests build tiny members of the same family.
"""
from __future__ import annotations

import torch
from torch import nn

from fr_distill.backbones import IRESNET_LAYERS
from fr_distill.models.layers import body_autocast, float32_head, scaled_channels

STEM_CHANNELS = 64
STAGE_CHANNELS = (64, 128, 256, 512)
FINAL_MAP_SIZE = 7  # 112 / 2**4
BN_EPS = 1e-5


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Improved residual block: BN, conv3x3, BN, PReLU, conv3x3 (strided), BN, + shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, eps=BN_EPS)
        self.conv1 = conv3x3(in_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch, stride)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch, eps=BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """InsightFace IResNet mapping [B,3,112,112] normalized images to [B,D] float32 embeddings."""

    def __init__(self, layers: tuple[int, int, int, int], embedding_dim: int = 512,
                 width: float = 1.0, dropout: float = 0.0, fp16: bool = False,
                 zero_init_residual: bool = False) -> None:
        super().__init__()
        self.fp16 = fp16
        self.embedding_dim = embedding_dim
        stem = scaled_channels(STEM_CHANNELS, width)
        stages = [scaled_channels(c, width) for c in STAGE_CHANNELS]
        self.conv1 = conv3x3(3, stem)
        self.bn1 = nn.BatchNorm2d(stem, eps=BN_EPS)
        self.prelu = nn.PReLU(stem)
        in_ch = stem
        for index, (blocks, out_ch) in enumerate(zip(layers, stages), start=1):
            setattr(self, f"layer{index}", self._make_layer(in_ch, out_ch, blocks))
            in_ch = out_ch
        self.bn2 = nn.BatchNorm2d(in_ch, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_ch * FINAL_MAP_SIZE * FINAL_MAP_SIZE, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim, eps=BN_EPS)
        self._init_weights(zero_init_residual)

    @staticmethod
    def _make_layer(in_ch: int, out_ch: int, blocks: int) -> nn.Sequential:
        """One stage: a strided block with a downsample shortcut, then ``blocks - 1`` blocks."""
        return nn.Sequential(IBasicBlock(in_ch, out_ch, stride=2),
                             *(IBasicBlock(out_ch, out_ch) for _ in range(blocks - 1)))

    def _init_weights(self, zero_init_residual: bool) -> None:
        """InsightFace's initialisation: conv N(0, 0.1), BN weight 1 / bias 0, frozen
        ``features.weight`` = 1; ``zero_init_residual`` zeroes each block's ``bn2.weight``."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad = False
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, IBasicBlock):
                    nn.init.zeros_(module.bn2.weight)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with body_autocast(x, self.fp16):
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.dropout(torch.flatten(self.bn2(x), 1))
        return float32_head(self._embed, x)


def iresnet(depth: int, embedding_dim: int = 512, **kwargs) -> IResNet:
    """IResNet of the given depth (18, 34, 50, 100 or 200); kwargs as :class:`IResNet`."""
    return IResNet(IRESNET_LAYERS[depth], embedding_dim=embedding_dim, **kwargs)
