"""Config → :class:`~fr_distill.engine.state.Run`: one rank's models, objective, optimizer,
schedule, scaler and loader, assembled in one place.

:func:`build_run` is what ``train`` does between the pre-flight and the loop: claim the run
directory, plan the batches, build the student (from ``model.init`` on a fresh start) under
DDP, the frozen teacher run on the fly (or, with ``teacher.cache``, its checked rows), the
objective with its head and memory bank, then :func:`assemble_run`, and restore the
checkpoint it resumes from (refused in one line if it does not fit the run).

:func:`assemble_run` is the public way to put models one already has (the benchmarks' random
teachers, a comm hook on the DDP wrapper) under the trainer's optimizer, schedule, scaler and
non-finite guard, all read from a :class:`~fr_distill.config.Config`, so that
:func:`fr_distill.engine.step.train_step` runs on them exactly as in training.
:func:`load_teacher` is the one reading of ``teacher.*`` into a frozen teacher, for training
and for ``cache-teacher``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fr_distill import dist, precision
from fr_distill.checkpoint import files as checkpoint
from fr_distill.checkpoint.files import CheckpointStore
from fr_distill.config import Config
from fr_distill.data import build_train_loader
from fr_distill.engine.faults import NonFiniteGuard
from fr_distill.engine.optim import build_optimizer
from fr_distill.engine.plan import make_plan
from fr_distill.engine.preflight import Preflight
from fr_distill.engine.run_dir import claim_run_dir
from fr_distill.engine.schedule import build_scheduler
from fr_distill.engine.state import Run
from fr_distill.eval.teacher_check import check_sets, check_teacher
from fr_distill.losses import build_objective
from fr_distill.models import FrozenTeacher, build_student, load_frozen_model
from fr_distill.models.weights import load_init_weights, read_init_weights
from fr_distill.teacher_cache import TeacherCache, open_cache

log = logging.getLogger(__name__)


def build_run(cfg: Config, info: dist.DistInfo, checked: Preflight,
              store: CheckpointStore) -> Run:
    """The run of ``cfg`` on this rank, after :func:`~fr_distill.engine.preflight.preflight`
    returned ``checked``; resumed from ``checked.resume_path`` when there is one."""
    device, resume_path, data_info = info.device, checked.resume_path, checked.data
    # read before the claim, which may move a checkpoint model.init names aside
    init_state, init_kind = (read_init_weights(cfg.model.init, cfg.model)
                             if cfg.model.init and resume_path is None else (None, ""))
    claim_run_dir(cfg.run.output_dir, store, fresh_start=resume_path is None,
                  resume=cfg.checkpoint.resume)
    resumed = checkpoint.load_for_resume(resume_path) if resume_path is not None else None
    plan = make_plan(cfg, data_info, info.world_size, resume_path, resumed)
    if resume_path is not None:
        log.info("resuming from %s (step %d)", resume_path, plan.resume_step)
        if cfg.model.init:
            log.info("model.init %s ignored: a resumed run takes the student from its checkpoint",
                     cfg.model.init)
    configure_determinism(cfg.run.deterministic)
    amp_dtype = precision.amp_dtype(cfg.precision.amp, device)

    # -- models: identical initialization on every rank ----------------------------------------
    seed_everything(cfg.run.seed)
    memory_format = precision.image_layout(cfg.model.channels_last, device)
    student = build_student(cfg.model.name, cfg.model.embedding_dim, cfg.model.width,
                            cfg.model.dropout).to(device, memory_format=memory_format)
    if init_state is not None:  # a fresh start from pretrained weights (draws no random numbers)
        skipped = load_init_weights(student, init_state, cfg.model.init, cfg.model)
        log.info("student initialized from %s (%s): %d tensors loaded strictly; left at their "
                 "fresh initialization (model.init_skip): %s", cfg.model.init, init_kind,
                 len(student.state_dict()) - len(skipped), ", ".join(skipped) or "none")
        del init_state
    teacher, teacher_accuracy, teacher_cache = None, None, None
    if cfg.teacher.cache:  # the teacher's rows, read instead of running it (METHOD §4)
        teacher_cache = open_cache(cfg, data_info, device, plan.batch_per_rank)
        teacher_accuracy = teacher_cache.manifest["teacher_check"]
    elif cfg.teacher.path:
        # outside the run's random stream: the student's and the head's initialization do not
        # depend on how (or whether) a teacher is built, so a cached run starts identically
        with torch.random.fork_rng(devices=[]):
            teacher = load_teacher(cfg, device)
        if resume_path is None and check_sets(cfg):
            teacher_accuracy = check_teacher(teacher, cfg, device, amp_dtype)
    # the teacher's own size: checkpoints, ONNX and TorchScript files carry theirs, only a
    # plain state dict is built with teacher.embedding_dim
    teacher_dim = (teacher.embedding_dim if teacher is not None else teacher_cache.embedding_dim
                   if teacher_cache is not None else cfg.model.embedding_dim)
    objective = build_objective(cfg.loss, data_info.num_classes, cfg.model.embedding_dim,
                                teacher_dim, plan.effective_batch,
                                cfg.model.projector, device, student)
    model = data_parallel(student, device)
    if cfg.model.compile and device.type == "cuda":
        model = torch.compile(model)
    elif cfg.model.compile:  # observed here, like channels_last in precision.image_layout
        log.warning("model.compile is ignored on the CPU: torch 2.14.1's compiled IResNet "
                    "backward corrupts the heap there (free(): invalid next size)")
    if teacher is not None and cfg.teacher.compile:
        teacher = torch.compile(teacher)

    # -- optimization and data -------------------------------------------------------------
    loader = build_train_loader(dataclasses.replace(cfg.data, batch_size=plan.batch_per_rank),
                                data_info, info.rank, info.world_size, device, cfg.run.seed)
    run = assemble_run(cfg, info, student, objective, model=model, teacher=teacher,
                       teacher_cache=teacher_cache, loader=loader, lr=plan.lr,
                       accumulation=plan.accumulation)
    seed_everything(cfg.run.seed + 7919 * (info.rank + 1))  # per-rank streams (e.g. dropout)
    if resumed is not None:
        run.load_state_dict(run.complete_checkpoint(resumed, resume_path))
        del resumed
    if teacher_accuracy is not None and resume_path is None:
        run.metrics["teacher_check"] = teacher_accuracy
    return run


def assemble_run(cfg: Config, info: dist.DistInfo, student: nn.Module, objective: nn.Module, *,
                 model: nn.Module | None = None, teacher: nn.Module | None = None,
                 teacher_cache: TeacherCache | None = None, loader=None, lr: float | None = None,
                 accumulation: int | None = None) -> Run:
    """``student`` and ``objective`` under the optimizer (``optim``), schedule (``schedule``,
    ``schedule.total_steps`` steps), GradScaler (``precision.amp`` fp16) and non-finite guard
    (``run.max_nonfinite_steps``) of ``cfg``, as one rank's :class:`Run` in
    ``run.output_dir``.

    ``model``: what the step calls (the student under DDP and/or compile; default the student
    itself). ``lr``: the base learning rate (default ``optim.lr``; training passes the scaled
    one). ``accumulation``: micro-steps per optimizer step (default
    ``optim.accumulation_steps``). ``loader`` None: the caller feeds the step its batches.
    """
    lr = cfg.optim.lr if lr is None else lr
    params = (list(student.parameters()) + objective.replicated_parameters()
              + objective.sharded_parameters())
    optimizer = build_optimizer(params, cfg.optim, lr)
    amp_dtype = precision.amp_dtype(cfg.precision.amp, info.device)
    return Run(cfg=cfg, info=info, run_dir=Path(cfg.run.output_dir), student=student,
               model=student if model is None else model, teacher=teacher, objective=objective,
               optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg.schedule, lr),
               scaler=torch.amp.GradScaler(info.device.type, enabled=amp_dtype == torch.float16),
               loader=loader, amp_dtype=amp_dtype,
               accumulation=cfg.optim.accumulation_steps if accumulation is None else accumulation,
               total_steps=cfg.schedule.total_steps,
               guard=NonFiniteGuard(cfg.run.max_nonfinite_steps), teacher_cache=teacher_cache)


def load_teacher(cfg: Config, device: torch.device) -> FrozenTeacher:
    """The frozen teacher ``teacher.path`` as ``teacher.*`` reads it, in the memory layout of
    the run's images (``model.channels_last``)."""
    t = cfg.teacher
    teacher = load_frozen_model(t.path, t.name, t.embedding_dim, t.width, device, t.onnx_backend,
                                t.input_mean, t.input_std)
    return teacher.to(memory_format=precision.image_layout(cfg.model.channels_last, device))


def data_parallel(student: nn.Module, device: torch.device) -> nn.Module:
    """The student under DDP (gradients all-reduced in buckets during the backward, BatchNorm
    buffers broadcast from rank 0 before each synchronized forward), or itself on one process."""
    if not dist.is_dist():
        return student
    return DistributedDataParallel(student, device_ids=[device] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def configure_determinism(deterministic: bool) -> None:
    """``run.deterministic``: deterministic kernels (slower); otherwise cuDNN autotuning."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not deterministic
