"""The optimizer: learning-rate scaling, no-decay parameter groups, gradient clipping
against torch's."""
from __future__ import annotations

import pytest
import torch

from fr_distill.config import OptimConfig
from fr_distill.engine.optim import build_optimizer, clip_gradients, param_groups, scaled_lr


def test_lr_scaling_and_no_decay_groups():
    assert scaled_lr(OptimConfig(lr=0.1, reference_batch=512), 128) == pytest.approx(0.025)
    assert scaled_lr(OptimConfig(lr=0.1, reference_batch=0), 128) == 0.1
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.PReLU(4))
    groups = param_groups(model.parameters(), OptimConfig(no_decay_bn_bias=True))
    assert [len(g["params"]) for g in groups] == [1, 4]
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    opt = build_optimizer(model.parameters(), OptimConfig(), lr=0.3)
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["lr"] == 0.3


def test_clip_gradients_matches_torch():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p) * 10
        q.grad = p.grad.clone()
    norm = clip_gradients(a[:1], a[1:], max_norm=1.0)
    ref = torch.nn.utils.clip_grad_norm_(b, max_norm=1.0)
    assert norm.item() == pytest.approx(ref.item(), rel=1e-6)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)
