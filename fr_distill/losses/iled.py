"""ILED, Instance-Level Embedding Distillation: METHOD (E2).

Each sample is pulled towards its teacher embedding through a rescaled softplus of
``s − c_i``: samples already closer than the target cosine ``s`` contribute almost nothing,
far ones contribute linearly with gradient weight ``σ(r(s − c_i) + b)`` (dynamic hard
mining), and the distance weighting ``ω_i`` scales each sample by its distance relative to
the **global** batch's mean distance, so the loss does not change with the world size.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fr_distill import dist
from fr_distill.losses.kd_inputs import KDInputs

MIN_MEAN_DISTANCE = 1e-12  # below this mean_G(1 − c) the student equals the teacher: ω ≡ 1


def distance_weights(cosine: torch.Tensor) -> torch.Tensor:
    """``ω_i = sg[(1 − c_i) / mean_G(1 − c)]`` of METHOD (E2); ``ω ≡ 1`` when the mean is ~0.

    ``mean_G`` is over the global batch: one all-reduce of (sum, count). No host sync.
    """
    with torch.no_grad():
        distance = 1.0 - cosine
        stats = torch.stack([distance.sum(), torch.ones_like(distance).sum()])
        total, count = dist.all_reduce_sum(stats).unbind()
        mean = total / count
        degenerate = mean < MIN_MEAN_DISTANCE
        return torch.where(degenerate, torch.ones_like(distance),
                           distance / mean.clamp_min(MIN_MEAN_DISTANCE))


def iled_per_sample(cosine: torch.Tensor, r: float, s: float, b: float) -> torch.Tensor:
    """``softplus_r(s − c_i + b/r) = (1/r)·log(1 + exp(r(s − c_i) + b))`` of METHOD (E2)."""
    return F.softplus(r * (s - cosine) + b) / r


class ILED(nn.Module):
    """METHOD (E2): ``L_ILED = mean_i ω_i · softplus_r(s − c_i + b/r)`` over this rank's batch.

    The mean over ranks of this value is the 1-rank value on the global batch (``ω`` uses
    the global normalizer), and under DDP's gradient averaging so are the gradients.
    """

    def __init__(self, r: float = 40.0, s: float = 0.9, b: float = 0.1,
                 distance_weighting: bool = True) -> None:
        super().__init__()
        self.r, self.s, self.b = r, s, b
        self.distance_weighting = distance_weighting

    def extra_repr(self) -> str:
        return f"r={self.r} s={self.s} b={self.b} distance_weighting={self.distance_weighting}"

    @torch.no_grad()
    def statistics(self, inputs: KDInputs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Mining statistics of METHOD D1 as ``(sum, count)`` on this rank: samples with
        ``c_i < s``, the ones the rescaled softplus still pulls at full strength."""
        below = (inputs.cosine < self.s).float()
        return {"iled/below_target": (below.sum(), torch.ones_like(below).sum())}

    def forward(self, inputs: KDInputs) -> torch.Tensor:
        per_sample = iled_per_sample(inputs.cosine, self.r, self.s, self.b)
        if self.distance_weighting:
            per_sample = distance_weights(inputs.cosine) * per_sample
        return per_sample.mean()
