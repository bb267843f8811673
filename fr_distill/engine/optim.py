"""SGD for the student and the objective's head, learning-rate scaling, gradient clipping.

SGD with momentum 0.9 and weight decay 5e-4 is the setting of SphereFace2 and InsightFace.
With ``optim.no_decay_bn_bias`` every parameter of at most one dimension (BatchNorm affine
weights, biases, PReLU slopes, the SphereFace2 bias) is left out of weight decay.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch

from fr_distill import dist
from fr_distill.config import OptimConfig

log = logging.getLogger(__name__)


def scaled_lr(cfg: OptimConfig, effective_batch: int) -> float:
    """``optim.lr``, scaled by ``effective_batch / optim.reference_batch`` when the latter is set.

    ``effective_batch`` = per-rank batch × world size × accumulation steps.
    """
    if cfg.reference_batch > 0:
        return cfg.lr * effective_batch / cfg.reference_batch
    return cfg.lr


def param_groups(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> list[dict]:
    """One group, or two (decayed / not decayed) with ``no_decay_bn_bias``."""
    params = [p for p in params if p.requires_grad]
    if not cfg.no_decay_bn_bias:
        return [{"params": params, "weight_decay": cfg.weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig,
                    lr: float) -> torch.optim.SGD:
    """SGD over ``params``; torch's fused kernel when ``optim.fused`` and the device has one."""
    groups = param_groups(params, cfg)
    if cfg.fused:
        try:
            return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, fused=True)
        except RuntimeError as err:  # device without a fused SGD kernel
            log.info("fused SGD unavailable (%s); using the foreach implementation", err)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)


def clip_gradients(local: list[torch.nn.Parameter], sharded: list[torch.nn.Parameter],
                   max_norm: float) -> torch.Tensor:
    """Scale all gradients so that their global L2 norm is at most ``max_norm``; return the norm.

    ``local`` parameters hold the same (already averaged) gradient on every rank; ``sharded``
    ones hold a different slice per rank, so their squared norms are summed over ranks.
    """
    local = [p for p in local if p.grad is not None]
    sharded = [p for p in sharded if p.grad is not None]
    local_grads, sharded_grads = [p.grad for p in local], [p.grad for p in sharded]
    device = (local_grads or sharded_grads)[0].device
    sq = torch.zeros((), device=device, dtype=torch.float32)
    if local_grads:
        sq = sq + torch.nn.utils.get_total_norm(local_grads).float() ** 2
    shard_sq = torch.zeros((), device=device, dtype=torch.float32)
    if sharded_grads:
        shard_sq = torch.nn.utils.get_total_norm(sharded_grads).float() ** 2
    total = (sq + dist.all_reduce_sum(shard_sq)).sqrt()
    torch.nn.utils.clip_grads_with_norm_(local + sharded, max_norm, total)
    return total
