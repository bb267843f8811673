"""The training loop: distill a frozen teacher into a student under torchrun DDP.

``train(cfg)`` reads top to bottom: process group → pre-flight (config paths, data, resume
checkpoint, batch plan) → models (student under DDP, frozen teacher run on the fly, the
objective with its head and memory bank) → optimizer, schedule, scaler, loader → restore the
checkpoint → loop. One optimizer step (:func:`train_step`) is ``accumulation`` micro-steps of
teacher forward (``no_grad``, autocast) + student forward/backward (autocast; DDP's gradient
sync only on the last micro-step) + objective, then the replicated head's gradients are
averaged over ranks, small all-reduces agree on non-finite embeddings (before the objective,
whose collectives every rank must then skip together), non-finite losses and stop signals,
and the optimizer, schedule and memory bank advance. Checkpointing, evaluation and logging are
callbacks (:mod:`fr_distill.engine.callbacks`, :mod:`fr_distill.engine.run_log`).

Nothing here branches on the rank: the collectives of ``dist`` are no-ops on one process,
and only logging and file writes (inside the callbacks) are rank 0's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fr_distill import dist, precision
from fr_distill.precision import autocast
from fr_distill.config import Config, check_paths
from fr_distill.data import Batch, build_train_loader, preflight
from fr_distill.engine import checkpoint
from fr_distill.engine.callbacks import (Callback, CallbackList, CheckpointCallback, EvalCallback,
                                         StepStats)
from fr_distill.engine.faults import NonFiniteGuard, StopSignal
from fr_distill.engine.run_log import LoggingCallback, setup_console
from fr_distill.engine.optim import build_optimizer, clip_gradients
from fr_distill.engine.plan import checkpoint_store, find_resume, make_plan
from fr_distill.engine.schedule import build_scheduler
from fr_distill.engine.state import Run
from fr_distill.losses import build_objective
from fr_distill.models import build_student, load_frozen_model

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
        dist.shutdown()


def _train(cfg: Config, info: dist.DistInfo, extra_callbacks: list[Callback]) -> TrainResult:
    device = info.device
    # -- pre-flight: before any model is built -------------------------------------------------
    check_paths(cfg)
    data_info = preflight(cfg.data)
    resume_path = find_resume(cfg)
    resumed = checkpoint.load(resume_path) if resume_path is not None else None
    plan = make_plan(cfg, data_info, info.world_size, resume_path, resumed)
    if resume_path is not None:
        log.info("resuming from %s (step %d)", resume_path, plan.resume_step)
    configure_determinism(cfg.run.deterministic)
    amp_dtype = precision.amp_dtype(cfg.precision.amp, device)

    # -- models: identical initialization on every rank ----------------------------------------
    seed_everything(cfg.run.seed)
    memory_format = image_layout(cfg, device)
    student = build_student(cfg.model).to(device, memory_format=memory_format)
    teacher = None
    if cfg.teacher.path:
        teacher = load_frozen_model(cfg.teacher.path, cfg.teacher.name, cfg.teacher.embedding_dim,
                               cfg.teacher.width, device, cfg.teacher.onnx_backend)
        teacher = teacher.to(memory_format=memory_format)
    objective = build_objective(cfg.loss, data_info.num_classes, cfg.model.embedding_dim,
                                cfg.teacher.embedding_dim, plan.effective_batch,
                                cfg.model.projector, device)
    model: nn.Module = student
    if dist.is_dist():
        model = DistributedDataParallel(student, device_ids=[device] if device.type == "cuda"
                                        else None, gradient_as_bucket_view=True)
    if cfg.model.compile and device.type == "cuda":
        model = torch.compile(model)
    elif cfg.model.compile:  # observed here, like channels_last in image_layout
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
              guard=NonFiniteGuard(cfg.run.max_nonfinite_steps))
    seed_everything(cfg.run.seed + 7919 * (info.rank + 1))  # per-rank streams (e.g. dropout)
    if resumed is not None:
        run.load_state_dict(resumed)
        del resumed

    # -- the loop ----------------------------------------------------------------------------
    store = checkpoint_store(cfg)
    logger = LoggingCallback()
    hooks = CallbackList([logger, EvalCallback(store, on_results=logger.eval_results),
                          CheckpointCallback(store), *extra_callbacks])
    run.set_train_mode()
    hooks.on_train_start(run)
    batches = loader.iterate(run.step * run.accumulation)
    with StopSignal() as stop:
        while not run.finished and not run.stop_requested:
            stats = train_step(run, batches, stop)
            hooks.on_step_end(run, stats)
    hooks.on_train_end(run)
    status = "completed" if run.finished else "preempted"
    log.info("%s at step %d", status, run.step)
    return TrainResult(status=status, step=run.step, start_step=run.start_step,
                       metrics=run.metrics, run_dir=run.run_dir, student=student,
                       teacher=teacher, objective=objective)


def train_step(run: Run, batches: Iterator[Batch], stop: StopSignal) -> StepStats:
    """One optimizer step over ``run.accumulation`` micro-batches; see the module docstring.

    A non-finite embedding or loss on any rank skips the step on all ranks (no optimizer step,
    no memory-bank update; the schedule still advances with the step counter) and is counted.
    """
    started, waited = time.perf_counter(), 0.0
    device, amp_dtype = run.info.device, run.amp_dtype
    memory_format = image_layout(run.cfg, device)
    lr = run.optimizer.param_groups[0]["lr"]
    outputs, bad, diagnostics = [], [], None
    diagnose = run.cfg.logging.diagnostics and run.logs_step(run.step + 1)
    for micro in range(run.accumulation):
        t = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - t
        images = batch.images.contiguous(memory_format=memory_format)
        with torch.no_grad(), autocast(device, amp_dtype):
            f_t = run.teacher(images).float() if run.teacher is not None else None
        last = micro == run.accumulation - 1
        with contextlib.nullcontext() if last else no_sync(run.model):
            with autocast(device, amp_dtype):
                f_s = run.model(images)
            f_s = f_s.float()
            bad_inputs = nonfinite_embeddings(f_s, f_t)
            if dist.all_reduce_sum(torch.tensor(float(len(bad_inputs)), device=device)).item() == 0:
                out = run.objective(f_s, f_t, batch.labels)
                loss = out.total
                bad += nonfinite_terms(out)
                if diagnose and last:  # METHOD D1, on the graph the backward then reuses
                    diagnostics = run.objective.diagnostics(out, f_s)
            else:  # on some rank: NaN gradients keep DDP's hooks in step; discarded below
                out, loss = None, f_s.sum() * 0.0
                bad += bad_inputs
            run.scaler.scale(loss / run.accumulation).backward()
        outputs.append((out, f_s.detach(), f_t))
    dist.average_gradients(run.objective.replicated_parameters())
    flags = dist.all_reduce_sum(torch.tensor([float(bool(bad)), float(stop.pending)], device=device))
    any_bad, any_stop = (v > 0 for v in flags.tolist())
    run.stop_requested = run.stop_requested or any_stop
    run.step += 1

    grad_norm = None
    if any_bad:
        run.optimizer.zero_grad(set_to_none=True)
        terms = sorted({name for names in dist.all_gather_object(bad) for name in names})
        log.warning("step %d: non-finite %s; step skipped", run.step, ", ".join(terms))
        run.guard.record(run.step, terms)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # schedule step without optimizer step
            run.scheduler.step()
    else:
        run.guard.reset()
        if run.cfg.optim.grad_clip > 0:
            run.scaler.unscale_(run.optimizer)
            grad_norm = clip_gradients(list(run.student.parameters())
                                       + run.objective.replicated_parameters(),
                                       run.objective.sharded_parameters(), run.cfg.optim.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        for _, f_s, f_t in outputs:
            run.objective.update_bank(f_s, f_t)

    done = [out for out, _, _ in outputs if out is not None]
    nan = torch.full((), float("nan"), device=device)
    terms = {k: torch.stack([o.terms[k] for o in done]).mean() for k in (done[0].terms if done else {})}
    cosines = [o.cosine for o in done if o.cosine is not None]
    return StepStats(
        step=run.step, terms=terms,
        total=torch.stack([o.total.detach() for o in done]).mean() if done else nan,
        cosine=torch.stack(cosines).mean() if cosines else None, lr=lr,
        images=run.global_batch * run.accumulation, data_wait_s=waited,
        step_time_s=time.perf_counter() - started,
        grad_scale=run.scaler.get_scale() if run.scaler.is_enabled() else 1.0,
        skipped=any_bad, grad_norm=grad_norm, diagnostics=None if any_bad else diagnostics)


# ----------------------------------------------------------------------------------------------
# Helpers of the loop
# ----------------------------------------------------------------------------------------------
def image_layout(cfg: Config, device: torch.device) -> torch.memory_format:
    """channels_last (``model.channels_last``) on CUDA, where its convolutions are faster.

    On the CPU, torch 2.14.1's channels_last IResNet backward corrupts the heap (``free():
    invalid next size``), and CPU kernels gain nothing from it, so the CPU keeps NCHW.
    """
    if cfg.model.channels_last and device.type == "cuda":
        return torch.channels_last
    return torch.contiguous_format


def no_sync(model: nn.Module):
    """DDP's ``no_sync`` (skip the gradient all-reduce of a non-final micro-step), if wrapped."""
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


def nonfinite_embeddings(f_s: torch.Tensor, f_t: torch.Tensor | None) -> list[str]:
    """Which of this rank's embeddings hold NaN/Inf (one device sync)."""
    tensors = {"student embeddings": f_s, "teacher embeddings": f_t}
    present = {name: t for name, t in tensors.items() if t is not None}
    finite = torch.stack([torch.isfinite(t).all() for t in present.values()]).tolist()
    return [name for name, ok in zip(present, finite) if not ok]


def nonfinite_terms(out) -> list[str]:
    """Names of the objective's non-finite terms (and ``total``), one device sync."""
    values = {**out.terms, "total": out.total.detach()}
    finite = torch.isfinite(torch.stack([v.float() for v in values.values()])).tolist()
    return [name for name, ok in zip(values, finite) if not ok]


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
