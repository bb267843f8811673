"""One optimizer step of the training loop, split into its phases, with one host read.

:func:`train_step` runs, for each of ``run.accumulation`` micro-batches,
:func:`teacher_forward` (the teacher, or its cached rows) → :func:`student_forward` → the objective (METHOD E5, plus D1 on
logging steps) → :func:`backward` (DDP's gradient all-reduce only on the last micro-step), then
:func:`agree` → :func:`optimizer_step` or :func:`skip_step` → :func:`update_bank` →
:func:`balance` (METHOD E7, on logging steps). The phases
are functions so that ``benchmarks.train`` times this very step (its ``mark``
argument), not a copy of it.

**One host read per optimizer step.** Reading a device value on the host stalls a GPU's
queue, so the step reads exactly one: in :func:`agree`, a small float vector that holds, for
each embedding and loss term, whether it was non-finite in any micro-step, and whether a stop
signal (SIGTERM/SIGUSR1) arrived, summed over ranks by one all-reduce. Until then nothing is
read: the objective runs without its own value checks, on every rank, even on non-finite
embeddings (its collectives stay in step), the backward and DDP's all-reduce run on whatever
came out, and a step that any rank found non-finite is then skipped everywhere (gradients
discarded, no optimizer step, no bank update; the schedule still advances). Labels cannot
be non-finite and are checked against the class count on the host by the loader. Loss terms,
cosine and gradient norm stay on the device for the logging callback, which reads a window's
averages on logging steps only. Exceptions: with fp16, torch's ``GradScaler.step`` reads its
found-inf flag; evaluation and checkpoints read what they need when they are due.
"""
from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from fr_distill import dist
from fr_distill.data import Batch
from fr_distill.engine.faults import StopSignal
from fr_distill.engine.optim import clip_gradients
from fr_distill.engine.state import Run
from fr_distill.losses.objective import ObjectiveOutput
from fr_distill.models.teacher import teacher_embeddings
from fr_distill.precision import autocast, image_layout

log = logging.getLogger(__name__)

@dataclass
class StepStats:
    """What one optimizer step measured on this rank (tensors stay on the device)."""

    step: int                                  # optimizer steps completed, this one included
    terms: dict[str, torch.Tensor]             # unweighted loss terms, mean over micro-steps
    total: torch.Tensor
    cosine: torch.Tensor | None
    lr: float                                  # learning rate this step used
    images: int                                # images of this step over all ranks
    data_wait_s: float
    step_time_s: float
    skipped: bool
    grad_norm: torch.Tensor | None = None
    diagnostics: dict[str, torch.Tensor] | None = None  # METHOD D1, on logging steps


#: Names of the embeddings in the non-finite flags; when one of them is non-finite, the loss
#: terms computed from it are too, and only the embeddings are reported.
EMBEDDINGS = ("student embeddings", "teacher embeddings")


def gradient_sync(model: nn.Module, last_micro_step: bool):
    """DDP's ``no_sync`` (no gradient all-reduce) on every micro-step but the last."""
    if last_micro_step or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def teacher_forward(run: Run, batch: Batch, images: torch.Tensor) -> torch.Tensor | None:
    """The teacher's float32 embeddings of ``batch``: its rows of the teacher-embedding cache
    (``teacher.cache``, looked up by the batch's indices and flips), else the frozen teacher
    run on ``images``; None without a teacher."""
    if run.teacher_cache is not None:
        return run.teacher_cache.lookup(batch.indices, batch.flips)
    if run.teacher is None:
        return None
    return teacher_embeddings(run.teacher, images, run.info.device, run.amp_dtype)


def student_forward(run: Run, images: torch.Tensor) -> torch.Tensor:
    """The student's embeddings under autocast, as float32 for the objective."""
    with autocast(run.info.device, run.amp_dtype):
        return run.model(images).float()


def backward(run: Run, loss: torch.Tensor) -> None:
    """Backward of this micro-step's share of the step's loss (scaled with fp16)."""
    run.scaler.scale(loss / run.accumulation).backward()


def nonfinite_flags(f_s: torch.Tensor, f_t: torch.Tensor | None,
                    out: ObjectiveOutput) -> tuple[list[str], torch.Tensor]:
    """Names and device-side flags (1.0 = holds NaN/Inf) of the embeddings, each loss term
    and the total; no host read."""
    values = {EMBEDDINGS[0]: f_s.detach(), **({EMBEDDINGS[1]: f_t} if f_t is not None else {}),
              **out.terms, "total": out.total.detach()}
    flags = torch.stack([(~torch.isfinite(v)).any() for v in values.values()]).float()
    return list(values), flags


def agree(run: Run, names: list[str], flags: torch.Tensor, stop: StopSignal) -> list[str]:
    """Average the replicated head's gradients over ranks, then sum the step's non-finite
    ``flags`` and this rank's stop signal over ranks: one all-reduce and the step's one host
    read. Sets ``run.stop_requested``; returns what was non-finite on any rank (the embeddings
    if they were, else the terms), empty for a good step."""
    dist.average_gradients(run.objective.replicated_parameters())
    local = torch.cat([flags, torch.tensor([float(stop.pending)], device=flags.device)])
    summed = dist.all_reduce_sum(local).tolist()
    run.stop_requested = run.stop_requested or summed[-1] > 0
    bad = [name for name, count in zip(names, summed) if count > 0]
    return [name for name in bad if name in EMBEDDINGS] or bad


def optimizer_step(run: Run) -> torch.Tensor | None:
    """Clip (``optim.grad_clip``), step the optimizer and the schedule, clear the gradients;
    returns the gradient norm before clipping (a device tensor), None without clipping."""
    run.guard.reset()
    grad_norm = None
    if run.cfg.optim.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        grad_norm = clip_gradients(list(run.student.parameters())
                                   + run.objective.replicated_parameters(),
                                   run.objective.sharded_parameters(), run.cfg.optim.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def skip_step(run: Run, bad: list[str]) -> None:
    """Discard the gradients of a non-finite step and count it (``run.max_nonfinite_steps``
    in a row stop the run); the schedule advances with the step counter."""
    run.optimizer.zero_grad(set_to_none=True)
    log.warning("step %d: non-finite %s; step skipped", run.step, ", ".join(bad))
    run.guard.record(run.step, bad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # schedule step without optimizer step
        run.scheduler.step()


def update_bank(run: Run, embeddings: list[tuple[torch.Tensor, torch.Tensor | None]],
                images: list[torch.Tensor]) -> None:
    """Enqueue each micro-step's global batch into the memory bank (METHOD E3); with
    ``ema_student_bank`` (E4) the EMA student follows the student first and embeds ``images``
    (each micro-step's) for the bank's student rows."""
    ema = None
    if run.objective.ema_student is not None:  # no autocast entered on the other steps
        with autocast(run.info.device, run.amp_dtype):
            ema = run.objective.ema_embeddings(run.student, images)
    for i, (f_s, f_t) in enumerate(embeddings):
        run.objective.update_bank(f_s, f_t, None if ema is None else ema[i])


def balance(run: Run, diagnostics: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """METHOD (E7) on a logging step: the balanced weights move towards their targets from
    this step's D1 ``diagnostics``, which then also carry the new weights for the log."""
    if diagnostics is None:
        return None
    return {**diagnostics, **run.objective.balance(diagnostics)}


def _no_mark(phase: str) -> None:
    pass


def train_step(run: Run, batches: Iterator[Batch], stop: StopSignal,
               mark: Callable[[str], None] = _no_mark) -> StepStats:
    """One optimizer step over ``run.accumulation`` micro-batches (see the module docstring);
    ``mark(phase)`` is called at the end of each phase (the train benchmark's timer)."""
    started, waited = time.perf_counter(), 0.0
    device = run.info.device
    lr = run.optimizer.param_groups[0]["lr"]
    diagnose = ((run.cfg.logging.diagnostics or run.cfg.loss.balance.enabled)
                and run.logs_step(run.step + 1))
    outputs: list[ObjectiveOutput] = []
    embeddings: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    micro_images: list[torch.Tensor] = []
    flags, diagnostics, images = None, None, 0
    for micro in range(run.accumulation):
        t = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - t
        images += batch.images.shape[0] * run.info.world_size
        mark("data")
        layout = image_layout(run.cfg.model.channels_last, device)
        batch_images = batch.images.contiguous(memory_format=layout)
        f_t = teacher_forward(run, batch, batch_images)
        if f_t is not None:
            mark("teacher")
        last = micro == run.accumulation - 1
        with gradient_sync(run.model, last):
            f_s = student_forward(run, batch_images)
            mark("student_fwd_bwd")
            out = run.objective(f_s, f_t, batch.labels, check_values=False)
            if diagnose and last:  # METHOD D1, on the graph the backward then reuses
                diagnostics = run.objective.diagnostics(out, f_s)
            names, micro_flags = nonfinite_flags(f_s, f_t, out)
            flags = micro_flags if flags is None else flags + micro_flags
            mark("objective")
            backward(run, out.total)
            mark("student_fwd_bwd")
        outputs.append(out)
        embeddings.append((f_s.detach(), f_t))
        micro_images.append(batch_images)
    bad = agree(run, names, flags, stop)
    mark("agree")
    run.step += 1
    grad_norm = None
    if bad:
        skip_step(run, bad)
        mark("optimizer")
    else:
        grad_norm = optimizer_step(run)
        mark("optimizer")
        update_bank(run, embeddings, micro_images)
        diagnostics = balance(run, diagnostics)
        mark("bank")
    cosines = [o.cosine for o in outputs if o.cosine is not None]
    return StepStats(
        step=run.step, terms={k: torch.stack([o.terms[k] for o in outputs]).mean()
                              for k in outputs[0].terms},
        total=torch.stack([o.total.detach() for o in outputs]).mean(),
        cosine=torch.stack(cosines).mean() if cosines else None, lr=lr, images=images,
        data_wait_s=waited, step_time_s=time.perf_counter() - started, skipped=bool(bad),
        grad_norm=grad_norm, diagnostics=None if bad else diagnostics)
