"""What a checkpoint holds of a run's objective and optimizer, and the check that a checkpoint
fits a run: the conversion between a rank's live state and the checkpoint's tensors.

Class-sharded parameters hold contiguous row blocks in rank order; their optimizer state is
stored as the full matrix (a sharded checkpoint: as row blocks of it) and re-sliced on load,
so a run resumes on another world size and head mode. A checkpoint of another student, head
or optimizer layout is refused in one line before any of its tensors is loaded
(:func:`check_fits`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fr_distill import dist
from fr_distill.checkpoint import files as checkpoint
from fr_distill.checkpoint import sharded as sharded_checkpoint


def objective_state(objective: nn.Module, optimizer: torch.optim.Optimizer,
                    sharded: bool) -> dict:
    """The checkpoint's ``objective`` and ``optimizer`` entries on the CPU: a class-sharded
    head and its momentum gathered whole (a collective), or with ``sharded`` this rank's rows
    (:func:`fr_distill.dist.row_block`)."""
    params = objective.sharded_parameters()
    return {"objective": to_cpu(objective.sharded_state_dict() if sharded
                                 else objective.state_dict()),
            "optimizer": to_cpu(_tag_sharded_state(optimizer, params) if sharded
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


def to_cpu(value):
    """Tensors moved to the CPU, through nested dicts, lists and tuples (e.g. a bank's state)."""
    if torch.is_tensor(value):
        moved = value.detach().cpu()
        if hasattr(value, "global_offsets"):  # a row block keeps its place in the matrix
            moved = dist.row_block(moved, value.global_offsets[0][0], value.global_shape[0])
        return moved
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
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
