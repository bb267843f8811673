"""The training loop: distill a frozen teacher into a student under torchrun DDP.

``train(cfg)`` reads top to bottom: process group → pre-flight (resume checkpoint, config
paths (``model.init`` only for a fresh start), the logging packages, data, a fresh start's
``model.init`` file read, the run directory claimed (:mod:`fr_distill.engine.run_dir`),
batch plan) → models (the student, loaded from ``model.init`` on a fresh start, under DDP;
the frozen teacher run on the fly, or with ``teacher.cache`` its checked rows
(:mod:`fr_distill.teacher_cache`); the objective with its head and memory bank) → optimizer,
schedule, scaler, loader → restore the checkpoint (refused in one line if it does not fit
the run) → loop. One optimizer step is :func:`fr_distill.engine.step.train_step`:
``accumulation`` micro-steps of teacher forward, student forward, objective and backward, one
all-reduce on which every rank agrees whether the step was finite and whether to stop (the
step's one host read), then the optimizer, schedule and memory bank advance. Checkpointing,
evaluation and logging are callbacks (:mod:`fr_distill.engine.callbacks`,
:mod:`fr_distill.engine.run_log`).

Nothing here branches on the rank: the collectives of ``dist`` are no-ops on one process,
and only logging and file writes (inside the callbacks) are rank 0's.
"""
from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fr_distill import dist, precision
from fr_distill.checkpoint import files as checkpoint
from fr_distill.config import Config, check_paths
from fr_distill.console import setup_console
from fr_distill.data import build_train_loader, preflight
from fr_distill.data.decode_check import apply_decode_check
from fr_distill.data.loader import select_backend
from fr_distill.engine.callbacks import Callback, CallbackList, CheckpointCallback, EvalCallback
from fr_distill.engine.faults import NonFiniteGuard, StopSignal, TrainingError
from fr_distill.engine.optim import build_optimizer
from fr_distill.engine.plan import checkpoint_store, find_resume, make_plan
from fr_distill.engine.run_dir import claim_run_dir, release as release_run_dir
from fr_distill.engine.run_log import LoggingCallback, check_logging
from fr_distill.engine.schedule import build_scheduler
from fr_distill.engine.state import Run
from fr_distill.engine.step import train_step
from fr_distill.eval.runner import check_bin_sets
from fr_distill.eval.teacher_check import check_sets, check_teacher
from fr_distill.losses import build_objective
from fr_distill.models import build_student, load_frozen_model
from fr_distill.models.weights import load_init_weights, read_init_weights
from fr_distill.teacher_cache import open_cache, release_cache

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """How a run ended: ``completed`` (reached ``schedule.total_steps``) or ``preempted``
    (stopped on SIGTERM/SIGUSR1 after checkpointing: exit with ``REQUEUE_EXIT_CODE``)."""

    status: str
    step: int
    start_step: int
    metrics: dict
    run_dir: Path
    student: nn.Module
    teacher: nn.Module | None
    objective: nn.Module


def train(cfg: Config, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train ``cfg`` on the process group of torchrun's environment (or one process).

    Resumes from the newest valid checkpoint in ``run.output_dir`` (``checkpoint.resume``).
    Extra ``callbacks`` run after the built-in ones at every hook.
    """
    info = dist.init(cfg.distributed.backend, cfg.distributed.device, cfg.distributed.timeout_s)
    setup_console(info.is_main)
    try:
        return _train(cfg, info, list(callbacks))
    finally:
        release_cache(cfg.teacher.cache, fcntl.LOCK_SH)  # the lock open_cache took
        release_run_dir(cfg.run.output_dir)
        dist.shutdown()


def _train(cfg: Config, info: dist.DistInfo, extra_callbacks: list[Callback]) -> TrainResult:
    device = info.device
    # -- pre-flight: before any model is built -------------------------------------------------
    resume_path = find_resume(cfg)  # first: a resumed run does not read model.init
    check_paths(cfg, resuming=resume_path is not None)
    dist.run_on_main(check_logging, cfg)
    data_info = apply_decode_check(preflight(cfg.data), cfg.data, select_backend(cfg.data.loader))
    dist.run_on_main(check_bin_sets, list(cfg.eval.bin_sets), cfg.eval.best_metric)
    dist.run_on_main(check_bin_sets, list(cfg.teacher.check_sets))
    store = checkpoint_store(cfg)
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
            teacher = load_frozen_model(cfg.teacher.path, cfg.teacher.name,
                                        cfg.teacher.embedding_dim, cfg.teacher.width, device,
                                        cfg.teacher.onnx_backend, cfg.teacher.input_mean,
                                        cfg.teacher.input_std)
        teacher = teacher.to(memory_format=memory_format)
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
    params = (list(student.parameters()) + objective.replicated_parameters()
              + objective.sharded_parameters())
    optimizer = build_optimizer(params, cfg.optim, plan.lr)
    scheduler = build_scheduler(optimizer, cfg.schedule, plan.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loader = build_train_loader(dataclasses.replace(cfg.data, batch_size=plan.batch_per_rank),
                                data_info, info.rank, info.world_size, device, cfg.run.seed)
    run = Run(cfg=cfg, info=info, run_dir=Path(cfg.run.output_dir), student=student, model=model,
              teacher=teacher, objective=objective, optimizer=optimizer, scheduler=scheduler,
              scaler=scaler, loader=loader, amp_dtype=amp_dtype,
              accumulation=plan.accumulation, total_steps=cfg.schedule.total_steps,
              guard=NonFiniteGuard(cfg.run.max_nonfinite_steps), teacher_cache=teacher_cache)
    seed_everything(cfg.run.seed + 7919 * (info.rank + 1))  # per-rank streams (e.g. dropout)
    if resumed is not None:
        run.load_state_dict(run.complete_checkpoint(resumed, resume_path))
        del resumed
    if teacher_accuracy is not None and resume_path is None:
        run.metrics["teacher_check"] = teacher_accuracy

    # -- the loop ----------------------------------------------------------------------------
    logger = LoggingCallback()
    evaluation = EvalCallback(store, on_results=logger.eval_results)
    hooks = CallbackList([logger, evaluation, CheckpointCallback(store), *extra_callbacks])
    run.set_train_mode()
    hooks.on_train_start(run)
    batches = loader.iterate(run.step * run.accumulation)
    with StopSignal() as stop:
        while not run.finished and not run.stop_requested:
            stats = train_step(run, batches, stop)
            hooks.on_step_end(run, stats)
    hooks.on_train_end(run)
    if evaluation.final_error is not None:
        raise TrainingError(f"final evaluation at step {run.step} failed ({evaluation.final_error});"
                            f" the checkpoint {store.step_path(run.step)} is saved")
    status = "completed" if run.finished else "preempted"
    log.info("%s at step %d", status, run.step)
    return TrainResult(status=status, step=run.step, start_step=run.start_step,
                       metrics=run.metrics, run_dir=run.run_dir, student=student,
                       teacher=teacher, objective=objective)


# ----------------------------------------------------------------------------------------------
# Helpers of the loop
# ----------------------------------------------------------------------------------------------
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
