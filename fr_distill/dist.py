"""Process-group setup and collective helpers.

Everything distributed in fr_distill goes through this module, and every helper is a no-op
(or the identity) when the process group is not initialized or the world size is 1, so the
rest of the code never branches on rank except for logging and file writes.

Backends: NCCL when the rank has a CUDA device, gloo on the CPU. gloo implements neither
``reduce_scatter`` nor ``all_gather_into_tensor`` on every build, so the autograd-aware
gather below falls back to ``all_reduce`` + slice there; the result is identical.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fr_distill.errors import FrDistillError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job (from torchrun's environment)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's variables (1 process if absent)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init(backend: str = "auto", device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Initialize the default process group from torchrun's environment.

    ``backend``: ``auto`` (NCCL with CUDA, else gloo), ``nccl`` or ``gloo``.
    ``device``: ``auto`` (``cuda:LOCAL_RANK`` if CUDA is available, else CPU), ``cuda`` or ``cpu``.
    With WORLD_SIZE unset or 1 no process group is created.
    """
    rank, world_size, local_rank = env_world()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        chosen = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
        timeout = datetime.timedelta(seconds=timeout_s)
        # torchrun keeps its store across worker restarts (static rendezvous): without a
        # per-attempt prefix a restarted rank can read a dead peer's address and fail to connect.
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(chosen, store=dist.PrefixStore(f"attempt_{attempt}", store),
                                rank=rank, world_size=world_size, timeout=timeout,
                                device_id=dev if chosen == "nccl" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def _backend_supports_reduce_scatter() -> bool:
    return dist.get_backend() == "nccl"


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks (out of place, no gradient)."""
    if not is_dist():
        return tensor.clone()
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) along dim 0 in rank order; no gradient."""
    if not is_dist():
        return tensor.detach()
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts, dim=0)


def all_gather_rows(tensor: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Concatenate ``tensor`` over ranks along dim 0 in rank order; row counts may differ.

    No gradient. Each rank's rows are broadcast in turn and moved to ``device`` (default: the
    tensor's), so only one rank's part is in flight on the accelerator at a time: this is how
    a class-sharded head is assembled for a checkpoint.
    """
    target = tensor.device if device is None else torch.device(device)
    if not is_dist():
        return tensor.detach().to(target)
    counts = all_gather_object(int(tensor.shape[0]))
    parts = []
    for src, rows in enumerate(counts):
        if src == rank():
            part = tensor.detach().contiguous()
        else:
            part = torch.empty((rows,) + tuple(tensor.shape[1:]), dtype=tensor.dtype,
                               device=tensor.device)
        dist.broadcast(part, src=src)
        parts.append(part.to(target))
    return torch.cat(parts, dim=0)


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def run_on_main(check, *args) -> None:
    """Run ``check(*args)`` on rank 0 only and raise the :class:`FrDistillError` it raised on
    every rank (a collective): a pre-flight check done once, failing everywhere alike."""
    error = None
    if is_main():
        try:
            check(*args)
        except FrDistillError as err:
            error = err
    error = broadcast_object(error)
    if error is not None:
        raise error


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensors_(tensors, src: int = 0) -> None:
    """Overwrite each tensor in place with rank ``src``'s values (replicated parameters that
    are not wrapped in DDP start identical on every rank)."""
    if not is_dist():
        return
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=src)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the summed gradient of its rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows = tensor.shape[0]
        return all_gather_cat(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        if _backend_supports_reduce_scatter():
            out = torch.empty((ctx.rows,) + grad.shape[1:], dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = rank() * ctx.rows
        return grad[start:start + ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` over ranks along dim 0, differentiably.

    The gradient reaching rank r's input is the sum, over all ranks, of the gradients of the
    rows rank r contributed. Equal row counts on every rank are required.
    """
    if not is_dist():
        return tensor
    return _GatherWithGrad.apply(tensor)


def average_gradients(params) -> None:
    """Average ``.grad`` of replicated parameters over ranks (what DDP does for its module)."""
    if not is_dist():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world_size())


# ----------------------------------------------------------------------------------------------
# Row blocks of a class-sharded matrix, as sharded checkpoints (torch.distributed.checkpoint) see them
# ----------------------------------------------------------------------------------------------
def row_block(tensor: torch.Tensor, start: int, total_rows: int) -> torch.Tensor:
    """``tensor``, rows ``[start, start + len)`` of a ``[total_rows, ...]`` matrix, tagged with
    its place in that matrix (the attributes of ``torch.distributed.checkpoint``'s
    ``CheckpointableTensor`` protocol): DCP then saves it as that block of the whole matrix and
    loads exactly those rows into it, whatever block sizes the checkpoint was written with."""
    zeros = (0,) * (tensor.dim() - 1)
    tensor.global_shape = (total_rows, *tensor.shape[1:])
    tensor.global_offsets = ((start, *zeros),)
    tensor.local_offsets = ((0, *zeros),)
    tensor.local_sizes = (tuple(tensor.shape),)
    return tensor


def rows_of(matrix: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows ``[start, end)`` of a whole matrix, or ``matrix`` itself when it is already the
    :func:`row_block` of those rows (read from a sharded checkpoint)."""
    offsets = getattr(matrix, "global_offsets", None)
    if offsets is not None and offsets[0][0] == start and matrix.shape[0] == end - start:
        return matrix
    return matrix[start:end]


def global_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape of the whole matrix ``tensor`` is a :func:`row_block` of (else its own)."""
    return tuple(getattr(tensor, "global_shape", tensor.shape))
