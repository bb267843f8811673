"""engine.build and engine.preflight: a run assembled from the config alone, and the one
pre-flight that train, --dry-run and cache-teacher share."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fr_distill import dist
from fr_distill.config import Config, ScheduleConfig, load_config
from fr_distill.engine.build import assemble_run, load_teacher
from fr_distill.engine.cache_teacher import build_cache
from fr_distill.engine.preflight import dry_run, preflight
from fr_distill.engine.trainer import train
from fr_distill.errors import FrDistillError
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


def overrides(data: Path, teacher: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [f"data.train={data / 'train'}", "data.loader=torch", "data.num_workers=0",
            "data.batch_size=8", "model.width=0.125", "model.embedding_dim=32",
            f"teacher.path={teacher}", "teacher.name=iresnet18", "teacher.width=0.125",
            "teacher.embedding_dim=32", "logging.tensorboard=false",
            f"run.output_dir={tmp_path / 'run'}", *extra]


def test_train_dry_run_and_cache_teacher_refuse_a_bad_check_set_in_the_same_line(
        synthetic_data, teacher_file, tmp_path):
    damaged = tmp_path / "damaged.bin"
    damaged.write_bytes(b"not a pickle")
    cfg = load_config(None, overrides(synthetic_data, teacher_file, tmp_path,
                                      f"teacher.check_sets=[{damaged}]"))
    cache_cfg = load_config(None, overrides(synthetic_data, teacher_file, tmp_path,
                                            f"teacher.check_sets=[{damaged}]",
                                            f"teacher.cache={tmp_path / 'cache'}"))
    messages = []
    for command in (lambda: train(cfg), lambda: dry_run(cfg), lambda: build_cache(cache_cfg)):
        with pytest.raises(FrDistillError) as err:
            command()
        messages.append(str(err.value))
    assert len(set(messages)) == 1 and str(damaged) in messages[0]
    assert "\n" not in messages[0]
    assert not (tmp_path / "cache").exists()  # refused before anything was written
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_preflight_names_the_resume_checkpoint_only_for_a_run(synthetic_data, teacher_file,
                                                               tmp_path):
    cfg = load_config(None, overrides(synthetic_data, teacher_file, tmp_path))
    checked = preflight(cfg)
    assert checked.resume_path is None
    assert checked.data.num_samples > 0 and checked.data.num_classes > 0
    assert preflight(cfg, cache_build=True).data.num_samples == checked.data.num_samples
