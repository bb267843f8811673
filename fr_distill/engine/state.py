"""The state of a training run: its components, and what a checkpoint holds of them.

:class:`Run` bundles the student, teacher, objective, optimizer, schedule, scaler and loader of
one rank with the step counter and the metrics. :meth:`Run.state_dict` is the checkpoint of
the project's checkpoint format (``format``, ``version``, ``step``, ``config``, ``student``,
``objective`` with the memory bank, ``optimizer``, ``scheduler``, ``scaler``, ``data``,
``rng``, ``metrics``); it is a collective (a class-sharded head and its momentum are
gathered, every rank's RNG state is collected), so every rank calls it and rank 0 writes it.
With ``sharded=True`` (``checkpoint.format=dcp``) nothing is gathered but the RNG states:
each rank's view keeps its own rows, tagged with their place in the matrix, and every rank
writes its part (:mod:`fr_distill.engine.sharded_checkpoint`).

Class-sharded parameters hold contiguous row blocks in rank order; their optimizer state is
stored as the full matrix (a sharded checkpoint: as row blocks of it) and re-sliced on load,
so a run resumes on another world size and head mode. A checkpoint of another student, head
or optimizer layout is refused in one line before any of its tensors is loaded
(:func:`check_fits`).
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
from fr_distill.engine import checkpoint, sharded_checkpoint
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
            "student": _to_cpu(self.student.state_dict()),
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
                "config": to_dict(self.cfg), "student": _to_cpu(self.student.state_dict()),
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


def objective_state(objective: nn.Module, optimizer: torch.optim.Optimizer,
                    sharded: bool) -> dict:
    """The checkpoint's ``objective`` and ``optimizer`` entries on the CPU: a class-sharded
    head and its momentum gathered whole (a collective), or with ``sharded`` this rank's rows
    (:func:`fr_distill.dist.row_block`)."""
    params = objective.sharded_parameters()
    return {"objective": _to_cpu(objective.sharded_state_dict() if sharded
                                 else objective.state_dict()),
            "optimizer": _to_cpu(_tag_sharded_state(optimizer, params) if sharded
                                 else _gather_sharded_state(optimizer, params))}


def checkpoint_shapes(path: Path, ckpt: dict) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of checkpoint ``path`` (``ckpt`` as
    :func:`checkpoint.load_for_resume` read it), under DCP's ``a/b/c`` names."""
    if sharded_checkpoint.TENSOR_PATHS not in ckpt:
        tensors = sharded_checkpoint.split_tensors(ckpt)[1]
        return {key: tuple(tensor.shape) for key, tensor in tensors.items()}
    try:
        return {key: tuple(size)
                for key, (size, _) in sharded_checkpoint.tensor_shapes(path).items()}
    except Exception as err:  # changed since it was verified: one line
        raise checkpoint.unloadable(path, err) from None


# the tensors whose names and shapes must be the run's (the memory bank is resized on load)
_CHECKED = ("student/", "objective/head.", "objective/projector.")


def check_fits(path: Path, ckpt: dict, shapes: dict[str, tuple[int, ...]], student: nn.Module,
               objective: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Refuse checkpoint ``path`` (``ckpt``, its tensors' ``shapes``) unless it holds this
    run's student (every name and shape), head and projector shapes (the memory bank is
    resized on load) and optimizer layout (parameters per group), before any of its tensors
    is loaded: :class:`checkpoint.CheckpointMismatchError`, one line naming the first tensor
    that differs with both shapes and how many others differ (a torch ``load_state_dict``
    would print one line per tensor, hundreds for another width)."""
    expected = {f"student/{key}": tuple(value.shape)
                for key, value in student.state_dict().items()}
    run_objective = {f"objective/{key}": value
                     for key, value in objective.sharded_state_dict().items()}
    expected.update({key: dist.global_shape(value) for key, value in run_objective.items()
                     if key.startswith(_CHECKED)})
    recorded = {key: shape for key, shape in shapes.items() if key.startswith(_CHECKED)}
    differences = [_difference(key, recorded.get(key), shape) for key, shape in expected.items()
                   if recorded.get(key) != shape]
    differences += [_difference(key, shape, None) for key, shape in recorded.items()
                    if key not in expected]
    groups = [len(group["params"]) for group in optimizer.param_groups]
    recorded_groups = [len(group["params"]) for group in ckpt["optimizer"]["param_groups"]]
    if not differences and groups != recorded_groups:
        differences = [f"its optimizer has {recorded_groups} parameters per group, this run's "
                       f"{groups} (another optim.no_decay_bn_bias or objective)"]
    if differences:
        raise mismatch(path, differences)


def _difference(key: str, recorded: tuple | None, expected: tuple | None) -> str:
    """How tensor ``key`` differs: its shape in the checkpoint and in this run (``None``:
    absent there)."""
    if recorded is None:
        return f"this run's '{key}' {list(expected)} is not in the checkpoint"
    if expected is None:
        return f"the checkpoint's '{key}' {list(recorded)} is not in this run"
    return f"'{key}' is {list(recorded)} in the checkpoint, {list(expected)} in this run"


def mismatch(path: Path, differences: list[str]) -> checkpoint.CheckpointMismatchError:
    """The one-line error for checkpoint ``path`` that does not fit this run: the first of
    ``differences`` and how many others there are."""
    others = f" (and {len(differences) - 1} other tensors differ)" if len(differences) > 1 else ""
    return checkpoint.CheckpointMismatchError(
        f"{path} does not fit this run: {differences[0]}{others}; resume with the settings it "
        f"was written with, or start afresh (checkpoint.resume=false)")


def load_sharded(path: Path, state: dict, objective: nn.Module,
                 optimizer: torch.optim.Optimizer) -> dict:
    """The sharded checkpoint ``path`` (its ``state.pt`` read as ``state``) with its tensors:
    this rank's rows of the head and its momentum, the replicated tensors whole. Where the
    run keeps its head's rows, a tensor of another size is refused
    (:class:`checkpoint.CheckpointMismatchError` naming ``path``) before any tensor is read
    (in training :func:`check_fits` refused it already)."""
    head = objective.head
    rows = set()
    if head is not None:  # the keys holding the head's [C, D] rows
        index = _param_index(optimizer)[id(head.weight)]
        rows = {"objective/head.weight", f"optimizer/state/{index}/momentum_buffer"}

    def destination(key: str, size: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        if key not in rows:
            return torch.empty(size, dtype=dtype)
        if tuple(size) != (head.num_classes, head.dim):
            raise mismatch(path, [_difference(key, tuple(size), (head.num_classes, head.dim))])
        if key == "objective/head.weight" and head.weight.device.type == "cpu":
            block = head.weight.detach()  # read in place: no second copy of the rows
        else:
            block = torch.empty((head.end - head.start, *size[1:]), dtype=dtype)
        return dist.row_block(block, head.start, head.num_classes)

    try:
        return sharded_checkpoint.load(path, state, destination)
    except checkpoint.CheckpointError:
        raise
    except Exception as err:  # a file changed since it was verified: one line
        raise checkpoint.unloadable(path, err) from None


def load_objective_state(ckpt: dict, objective: nn.Module,
                         optimizer: torch.optim.Optimizer) -> None:
    """Restore the ``objective`` and ``optimizer`` entries of a checkpoint (either format)."""
    objective.load_state_dict(ckpt["objective"])
    optimizer.load_state_dict(_slice_sharded_state(ckpt["optimizer"], optimizer,
                                                   objective.sharded_parameters()))


def _own_rows(matrix: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows ``[start, end)`` of ``matrix`` in their own memory (a slice of a whole matrix is
    copied so the matrix can be freed; a block read for these rows is used as it is)."""
    rows = dist.rows_of(matrix, start, end)
    return rows if rows is matrix else rows.clone()


def _to_cpu(value):
    """Tensors moved to the CPU, through nested dicts, lists and tuples (e.g. a bank's state)."""
    if torch.is_tensor(value):
        moved = value.detach().cpu()
        if hasattr(value, "global_offsets"):  # a row block keeps its place in the matrix
            moved = dist.row_block(moved, value.global_offsets[0][0], value.global_shape[0])
        return moved
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


def _tag_sharded_state(optimizer: torch.optim.Optimizer, sharded: list[nn.Parameter]) -> dict:
    """``optimizer.state_dict()`` with each sharded parameter's per-row state tagged as this
    rank's rows of the whole matrix (:func:`fr_distill.dist.row_block`), not gathered."""
    state = optimizer.state_dict()
    index = _param_index(optimizer)
    for p, (start, total) in zip(sharded, _row_layout(sharded)):
        i = index[id(p)]
        if i in state["state"]:
            state["state"][i] = {key: dist.row_block(value.detach(), start, total)
                                 if torch.is_tensor(value) and value.shape == p.shape else value
                                 for key, value in state["state"][i].items()}
    return state


def _row_layout(sharded: list[nn.Parameter]) -> list[tuple[int, int]]:
    """``(first row of this rank, rows over all ranks)`` of each sharded parameter (ranks
    hold contiguous blocks in rank order); a collective."""
    counts = dist.all_gather_object([int(p.shape[0]) for p in sharded])
    return [(sum(rows[j] for rows in counts[:dist.rank()]), sum(rows[j] for rows in counts))
            for j in range(len(sharded))]


def _slice_sharded_state(state: dict, optimizer: torch.optim.Optimizer,
                         sharded: list[nn.Parameter]) -> dict:
    """This rank's rows of each sharded parameter's stored optimizer state (the whole matrix,
    or from a sharded checkpoint already this rank's rows)."""
    index = _param_index(optimizer)
    for p, (start, _) in zip(sharded, _row_layout(sharded)):
        i = index[id(p)]
        if i in state["state"]:
            state["state"][i] = {key: _own_rows(value, start, start + p.shape[0])
                                 if torch.is_tensor(value) and value.dim() == p.dim()
                                 and value.shape[1:] == p.shape[1:] else value
                                 for key, value in state["state"][i].items()}
    return state
