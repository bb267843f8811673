"""Learning-rate schedules in optimizer steps: multistep, cosine and polynomial, each with an
optional linear warmup.

The paper's setting (SphereFace2 on VGGFace2) is ``multistep``: lr 0.1, ×0.1 at 40k, 60k and
70k iterations of a 512-image global batch. The schedule is a torch ``LambdaLR`` over a
closure, so its checkpointed state is just its step count: a resumed run may change the
schedule's settings and the new ones apply from the resumed step.
"""
from __future__ import annotations

import bisect
import math
from typing import Callable

import torch

from fr_distill.config import ScheduleConfig


def lr_factor(cfg: ScheduleConfig, base_lr: float) -> Callable[[int], float]:
    """``step -> lr(step) / base_lr`` for 0-based optimizer step ``step``.

    Warmup multiplies by ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps.
    ``multistep`` then multiplies by ``gamma`` per milestone reached; ``cosine`` and ``poly``
    go from ``base_lr`` at the end of warmup to ``min_lr`` at ``total_steps``.
    """
    warmup, total = cfg.warmup_steps, cfg.total_steps
    milestones = list(cfg.milestones)
    floor = cfg.min_lr / base_lr

    def factor(step: int) -> float:
        warm = (step + 1) / warmup if step < warmup else 1.0
        if cfg.name == "multistep":
            return warm * cfg.gamma ** bisect.bisect_right(milestones, step)
        progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
        if cfg.name == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:  # poly
            decay = (1.0 - progress) ** cfg.power
        return warm * (floor + (1.0 - floor) * decay)

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig,
                    base_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepping once per optimizer step (after it)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, base_lr))
