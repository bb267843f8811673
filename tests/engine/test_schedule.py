"""Learning-rate schedules: multistep, cosine and polynomial with warmup, and a resumed
scheduler continuing exactly."""
from __future__ import annotations

import math

import pytest
import torch

from fr_distill.config import ScheduleConfig
from fr_distill.engine.schedule import build_scheduler, lr_factor


def _lrs(cfg: ScheduleConfig, base: float = 0.1) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = build_scheduler(opt, cfg, base)
    out = []
    for _ in range(cfg.total_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_multistep_with_warmup():
    cfg = ScheduleConfig(name="multistep", total_steps=10, warmup_steps=2, milestones=[4, 7],
                         gamma=0.1)
    expected = [0.05, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001, 0.001]
    assert _lrs(cfg) == pytest.approx(expected, rel=1e-12)


def test_paper_multistep_boundaries():
    f = lr_factor(ScheduleConfig(), 0.1)
    assert [f(s) for s in (0, 39999, 40000, 59999, 60000, 70000, 79999)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.001, 0.001])


def test_cosine_and_poly():
    cos = ScheduleConfig(name="cosine", total_steps=11, warmup_steps=1, min_lr=0.01)
    lrs = _lrs(cos)
    assert lrs[0] == pytest.approx(0.1)  # warmup: (0+1)/1
    for s in range(1, 11):
        p = (s - 1) / 10
        assert lrs[s] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * p)))
    poly = ScheduleConfig(name="poly", total_steps=5, warmup_steps=0, power=2.0)
    assert _lrs(poly) == pytest.approx([0.1 * (1 - s / 5) ** 2 for s in range(5)])


def test_scheduler_resume_continues_exactly():
    cfg = ScheduleConfig(name="cosine", total_steps=20, warmup_steps=3)
    full = _lrs(cfg)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler(opt, cfg, 0.1)
    for _ in range(7):
        opt.step(), sched.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched2 = build_scheduler(opt2, cfg, 0.1)  # built first, as the trainer does, then loaded
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    resumed = []
    for _ in range(7, 20):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step(), sched2.step()
    assert resumed == full[7:]
