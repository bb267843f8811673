"""The state of a training run: its components, and what a checkpoint holds of them.

:class:`Run` bundles the student, teacher, objective, optimizer, schedule, scaler and loader of
one rank with the step counter and the metrics. :meth:`Run.state_dict` is the checkpoint of
the project's checkpoint format (``format``, ``version``, ``step``, ``config``, ``student``,
``objective`` with the memory bank, ``optimizer``, ``scheduler``, ``scaler``, ``data``,
``rng``, ``metrics``); it is a collective (a class-sharded head and its momentum are
gathered, every rank's RNG state is collected), so every rank calls it and rank 0 writes it.
With ``sharded=True`` (``checkpoint.format=dcp``) nothing is gathered but the RNG states:
each rank's view keeps its own rows, tagged with their place in the matrix, and every rank
writes its part (:mod:`fr_distill.checkpoint.sharded`).

The conversion between this state and the checkpoint's tensors is
:mod:`fr_distill.checkpoint.state`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fr_distill import dist
from fr_distill.checkpoint import files as checkpoint
from fr_distill.checkpoint import sharded as sharded_checkpoint
from fr_distill.checkpoint.state import (check_fits, checkpoint_shapes, load_objective_state,
                                         load_sharded, objective_state, to_cpu)
from fr_distill.config import Config, to_dict
from fr_distill.data import TrainLoader
from fr_distill.engine.faults import NonFiniteGuard
from fr_distill.teacher_cache.store import TeacherCache

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One rank's view of a training run."""

    cfg: Config
    info: dist.DistInfo
    run_dir: Path
    student: nn.Module            # the bare student (no DDP / compile wrapper)
    model: nn.Module              # what the loop calls: the student under DDP and/or compile
    teacher: nn.Module | None
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loader: TrainLoader | None    # None where batches come from elsewhere (train benchmark)
    amp_dtype: torch.dtype | None
    accumulation: int
    total_steps: int
    guard: NonFiniteGuard
    step: int = 0
    start_step: int = 0
    metrics: dict = field(default_factory=dict)
    stop_requested: bool = False
    teacher_cache: TeacherCache | None = None  # teacher.cache: rows instead of the teacher

    @property
    def global_batch(self) -> int:
        """Images per micro-step over all ranks."""
        return self.loader.global_batch

    @property
    def effective_batch(self) -> int:
        """Images per optimizer step over all ranks."""
        return self.loader.global_batch * self.accumulation

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    def logs_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) ends a logging window: every
        ``logging.every_steps`` and the last step."""
        return step % self.cfg.logging.every_steps == 0 or step >= self.total_steps

    def set_train_mode(self) -> None:
        """Student in training mode; with ``model.freeze_bn`` its BatchNorm layers stay in eval."""
        self.student.train()
        if self.cfg.model.freeze_bn:
            for module in self.student.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    # -- checkpoint ---------------------------------------------------------------------------
    def state_dict(self, sharded: bool = False) -> dict:
        """The checkpoint of this step (collective: call on every rank). ``sharded``: this
        rank's view for a sharded checkpoint, whose class-sharded rows (head and momentum)
        stay this rank's (:func:`fr_distill.dist.row_block`) instead of being gathered."""
        return {
            "format": checkpoint.FORMAT, "version": checkpoint.VERSION, "step": self.step,
            "config": to_dict(self.cfg),
            "student": to_cpu(self.student.state_dict()),
            **objective_state(self.objective, self.optimizer, sharded),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "data": {**self.loader.state_dict(), "position": self.step * self.accumulation,
                     "global_batch": self.global_batch, "world_size": self.info.world_size},
            "rng": {"world_size": self.info.world_size,
                    "ranks": dist.all_gather_object(checkpoint.rng_state(self.info.device))},
            "faults": self.guard.state_dict(),
            "metrics": self.metrics,
        }

    def student_state_dict(self) -> dict:
        """A checkpoint of the student alone (``best.pt`` of a sharded run): what export,
        evaluation and ``model.init`` read, without gathering the head."""
        return {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "step": self.step,
                "config": to_dict(self.cfg), "student": to_cpu(self.student.state_dict()),
                "metrics": self.metrics}

    def complete_checkpoint(self, ckpt: dict, path: Path) -> dict:
        """``ckpt`` as :func:`checkpoint.load_for_resume` read it, checked to fit this run
        (:func:`check_fits`), with a sharded checkpoint's tensors read in: this rank's rows of
        the head and its momentum (whatever world size and head mode wrote them), the
        replicated tensors whole."""
        sharded = sharded_checkpoint.TENSOR_PATHS in ckpt
        check_fits(path, ckpt, checkpoint_shapes(path, ckpt), self.student, self.objective,
                   self.optimizer)
        return load_sharded(path, ckpt, self.objective, self.optimizer) if sharded else ckpt

    def load_state_dict(self, ckpt: dict) -> None:
        """Restore a checkpoint written by :meth:`state_dict` (any world size)."""
        self.student.load_state_dict(ckpt["student"])
        load_objective_state(ckpt, self.objective, self.optimizer)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.guard.load_state_dict(ckpt["faults"])
        self.metrics = dict(ckpt["metrics"])
        self.step = self.start_step = int(ckpt["step"])
        rng = ckpt["rng"]
        if rng["world_size"] == self.info.world_size:
            checkpoint.set_rng_state(rng["ranks"][self.info.rank], self.info.device)
        else:
            log.warning("resuming on %d ranks from a checkpoint of %d: random states re-seeded "
                        "(the data order and the memory bank do not depend on them)",
                        self.info.world_size, rng["world_size"])
