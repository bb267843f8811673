"""The assembly of a run from the config alone: optimizer, schedule, scaler and guard, and
the teacher from its keys."""
from __future__ import annotations

import pytest
import torch

from fr_distill import dist
from fr_distill.config import Config, ScheduleConfig, load_config
from fr_distill.engine.build import assemble_run, load_teacher
from fr_distill.losses import build_objective
from fr_distill.models import get_backbone


def test_assemble_run_takes_optimizer_schedule_scaler_and_guard_from_the_config(tmp_path):
    cfg = Config()
    cfg.run.output_dir = str(tmp_path / "run")
    cfg.run.max_nonfinite_steps = 3
    cfg.optim.lr, cfg.optim.momentum, cfg.optim.accumulation_steps = 0.05, 0.5, 2
    cfg.schedule = ScheduleConfig(name="multistep", milestones=[2], gamma=0.1, total_steps=7)
    cfg.precision.amp = "fp16"
    student = get_backbone("iresnet18", 16, width=0.125)
    objective = build_objective(cfg.loss, 10, 16, 16, 8)
    run = assemble_run(cfg, dist.DistInfo(device=torch.device("cpu")), student, objective)

    assert run.model is student and run.teacher is None and run.loader is None
    assert run.run_dir == tmp_path / "run"
    assert (run.accumulation, run.total_steps, run.guard.limit) == (2, 7, 3)
    optimized = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    trainable = [p for p in [*student.parameters(), *objective.replicated_parameters()]
                 if p.requires_grad]
    assert {id(p) for p in trainable} == optimized
    assert run.optimizer.param_groups[0]["momentum"] == 0.5
    lrs = []
    for _ in range(3):
        lrs.append(run.optimizer.param_groups[0]["lr"])
        run.optimizer.step()
        run.scheduler.step()
    assert lrs == pytest.approx([0.05, 0.05, 0.005])
    assert run.scaler.is_enabled() == (run.amp_dtype is torch.float16)

    passed = assemble_run(cfg, dist.DistInfo(device=torch.device("cpu")), student, objective,
                          lr=0.2, accumulation=1)
    assert (passed.optimizer.param_groups[0]["lr"], passed.accumulation) == (0.2, 1)


def test_load_teacher_reads_the_teacher_keys(teacher_file):
    cfg = load_config(None, [f"teacher.path={teacher_file}", "teacher.name=iresnet18",
                             "teacher.width=0.125", "teacher.embedding_dim=32"])
    teacher = load_teacher(cfg, torch.device("cpu"))
    assert teacher.embedding_dim == 32
    assert not any(p.requires_grad for p in teacher.parameters())
