"""The state of a training run: its components, and what a checkpoint holds of them.

:class:`Run` bundles the student, teacher, objective, optimizer, schedule, scaler and loader of
one rank with the step counter and the metrics. :meth:`Run.state_dict` is the checkpoint of
the project's checkpoint format (``format``, ``version``, ``step``, ``config``, ``student``,
``objective`` with the memory bank, ``optimizer``, ``scheduler``, ``scaler``, ``data``,
``rng``, ``metrics``); it is a collective (a class-sharded head and its momentum are
gathered, every rank's RNG state is collected), so every rank calls it and rank 0 writes it.

Class-sharded parameters hold contiguous row blocks in rank order; their optimizer state is
stored as the full matrix and re-sliced on load, so a run resumes on another world size.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fr_distill import dist
from fr_distill.config import Config, to_dict
from fr_distill.data import TrainLoader
from fr_distill.engine import checkpoint
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
    def state_dict(self) -> dict:
        """The checkpoint of this step (collective: call on every rank)."""
        return {
            "format": checkpoint.FORMAT, "version": checkpoint.VERSION, "step": self.step,
            "config": to_dict(self.cfg),
            "student": _to_cpu(self.student.state_dict()),
            "objective": _to_cpu(self.objective.state_dict()),
            "optimizer": _to_cpu(_gather_sharded_state(self.optimizer,
                                                       self.objective.sharded_parameters())),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "data": {**self.loader.state_dict(), "position": self.step * self.accumulation,
                     "global_batch": self.global_batch, "world_size": self.info.world_size},
            "rng": {"world_size": self.info.world_size,
                    "ranks": dist.all_gather_object(checkpoint.rng_state(self.info.device))},
            "faults": self.guard.state_dict(),
            "metrics": self.metrics,
        }

    def load_state_dict(self, ckpt: dict) -> None:
        """Restore a checkpoint written by :meth:`state_dict` (any world size)."""
        self.student.load_state_dict(ckpt["student"])
        self.objective.load_state_dict(ckpt["objective"])
        self.optimizer.load_state_dict(
            _slice_sharded_state(ckpt["optimizer"], self.optimizer,
                                 self.objective.sharded_parameters()))
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


def _to_cpu(value):
    """Tensors moved to the CPU, through nested dicts, lists and tuples (e.g. a bank's state)."""
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _param_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """``id(param)`` → its index in the optimizer's ``state_dict`` (the order of its groups)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {id(p): i for i, p in enumerate(params)}


def _gather_sharded_state(optimizer: torch.optim.Optimizer, sharded: list[nn.Parameter]) -> dict:
    """``optimizer.state_dict()`` with each sharded parameter's per-row state gathered whole."""
    state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: copy
    index = _param_index(optimizer)
    for p in sharded:
        i = index[id(p)]
        if i in state["state"]:
            state["state"][i] = {key: dist.all_gather_rows(value, device="cpu")
                                 if torch.is_tensor(value) and value.shape == p.shape else value
                                 for key, value in state["state"][i].items()}
    return state


def _slice_sharded_state(state: dict, optimizer: torch.optim.Optimizer,
                         sharded: list[nn.Parameter]) -> dict:
    """This rank's rows of each sharded parameter's stored (whole-matrix) optimizer state."""
    index = _param_index(optimizer)
    for p in sharded:
        rows = dist.all_gather_object(int(p.shape[0]))
        start = sum(rows[:dist.rank()])
        i = index[id(p)]
        if i in state["state"]:
            state["state"][i] = {key: value[start:start + p.shape[0]].clone()
                                 if torch.is_tensor(value) and value.dim() == p.dim()
                                 and value.shape[1:] == p.shape[1:] else value
                                 for key, value in state["state"][i].items()}
    return state
