"""The training loop: distill a frozen teacher into a student under torchrun DDP.

``train(cfg)`` reads top to bottom: process group → the pre-flight
(:mod:`fr_distill.engine.preflight`: resume checkpoint, config paths (``model.init`` only
for a fresh start), the logging packages, data, evaluation and teacher-check sets) → the run
(:func:`fr_distill.engine.build.build_run`: the run directory claimed, batch plan, the
student under DDP, the frozen teacher on the fly or its cached rows, the objective,
optimizer, schedule, scaler and loader, the checkpoint restored) → loop. One optimizer step
is :func:`fr_distill.engine.step.train_step`: ``accumulation`` micro-steps of teacher
forward, student forward, objective and backward, one all-reduce on which every rank agrees
whether the step was finite and whether to stop (the step's one host read), then the
optimizer, schedule and memory bank advance. Checkpointing, evaluation and logging are
callbacks (:mod:`fr_distill.engine.callbacks`, :mod:`fr_distill.engine.run_log`).

Nothing here branches on the rank: the collectives of ``dist`` are no-ops on one process,
and only logging and file writes (inside the callbacks) are rank 0's.
"""
from __future__ import annotations

import fcntl
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from torch import nn

from fr_distill import dist
from fr_distill.config import Config
from fr_distill.console import setup_console
from fr_distill.engine.build import build_run
from fr_distill.engine.callbacks import Callback, CallbackList, CheckpointCallback, EvalCallback
from fr_distill.engine.faults import StopSignal, TrainingError
from fr_distill.engine.plan import checkpoint_store
from fr_distill.engine.preflight import preflight
from fr_distill.engine.run_dir import release as release_run_dir
from fr_distill.engine.run_log import LoggingCallback
from fr_distill.engine.step import train_step
from fr_distill.teacher_cache import release_cache

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
    checked = preflight(cfg)  # every input, before any model is built
    store = checkpoint_store(cfg)
    run = build_run(cfg, info, checked, store)

    # -- the loop ----------------------------------------------------------------------------
    logger = LoggingCallback()
    evaluation = EvalCallback(store, on_results=logger.eval_results)
    hooks = CallbackList([logger, evaluation, CheckpointCallback(store), *extra_callbacks])
    run.set_train_mode()
    hooks.on_train_start(run)
    batches = run.loader.iterate(run.step * run.accumulation)
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
                       metrics=run.metrics, run_dir=run.run_dir, student=run.student,
                       teacher=run.teacher, objective=run.objective)
