"""The globally shared memory bank of past embeddings: METHOD (E3).

Two ring buffers ``M^t, M^s`` of ``Q = bank_factor · G`` normalized, detached embeddings;
row ``j`` of both holds the teacher and the student embedding of the same past sample.
After each step every rank enqueues the all-gathered (rank-ordered) embeddings of the
global batch, so the bank is identical on every rank and never holds the current batch
while the loss is computed. Rows fill from row 0 upwards, so the filled rows are always
``[0, filled)``.

Updates: ``fifo`` overwrites the oldest rows; ``random`` fills empty rows first, then
overwrites uniformly chosen distinct older rows, drawn from a generator seeded with
``(seed, rows enqueued so far)`` — reproducible, identical on every rank, and exact on resume.

State (``state_dict``): both buffers, the per-row sequence number ``stamp`` (the index of
the sample in the stream of enqueued rows, ``-1`` for empty rows; it defines "newest"), and
``ptr``/``filled``/``count`` (write pointer, fill count, rows enqueued so far). Loading a
state saved with another capacity (a different global batch) keeps the newest
``min(filled, Q_new)`` rows, in age order.
"""
from __future__ import annotations

import numpy
import torch
import torch.nn as nn

from fr_distill.losses.errors import ObjectiveInputError, shape_of

UPDATE_MODES = ("fifo", "random")


class MemoryBank(nn.Module):
    """METHOD (E3): teacher and student FIFO (or seeded random) ring buffers of ``capacity`` rows."""

    def __init__(self, capacity: int, dim: int, update: str = "fifo", seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        if capacity < 1:
            raise ObjectiveInputError(f"memory bank capacity must be >= 1, got {capacity}")
        if update not in UPDATE_MODES:
            raise ObjectiveInputError(f"memory bank update must be one of "
                                      f"{', '.join(UPDATE_MODES)}, got {update!r}")
        self.capacity, self.dim, self.update, self.seed = capacity, dim, update, seed
        self.register_buffer("teacher", torch.zeros(capacity, dim, device=device))
        self.register_buffer("student", torch.zeros(capacity, dim, device=device))
        self.register_buffer("stamp", torch.full((capacity,), -1, dtype=torch.int64, device=device))
        self.ptr = 0
        self.filled = 0
        self.count = 0

    def extra_repr(self) -> str:
        return (f"capacity={self.capacity} dim={self.dim} update={self.update} "
                f"filled={self.filled}")

    def filled_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M^t, M^s)`` restricted to the filled rows."""
        return self.teacher[:self.filled], self.student[:self.filled]

    def _target_rows(self, n: int) -> torch.Tensor:
        """Rows (CPU int64) that the next ``n`` enqueued samples overwrite, oldest sample first."""
        if self.update == "fifo":
            rows = (self.ptr + torch.arange(n)) % self.capacity
            self.ptr = (self.ptr + n) % self.capacity
            return rows
        fresh = torch.arange(self.filled, min(self.filled + n, self.capacity))
        entropy = numpy.random.SeedSequence([self.seed, self.count]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(entropy))
        replaced = torch.randperm(self.filled, generator=generator)[:n - fresh.numel()]
        return torch.cat([fresh, replaced])

    @torch.no_grad()
    def enqueue(self, teacher_hat: torch.Tensor, student_hat: torch.Tensor) -> None:
        """Write the rows of the (already gathered, normalized) global batch, oldest first.

        A batch larger than the bank keeps only its last ``capacity`` rows.
        """
        if teacher_hat.shape != student_hat.shape or teacher_hat.shape[1:] != (self.dim,):
            raise ObjectiveInputError(
                f"memory bank enqueue: teacher {shape_of(teacher_hat)} and student "
                f"{shape_of(student_hat)} must both be [N, {self.dim}]")
        total = teacher_hat.shape[0]
        n = min(total, self.capacity)
        stamps = torch.arange(self.count + total - n, self.count + total, dtype=torch.int64)
        rows = self._target_rows(n).to(self.teacher.device)
        self.teacher.index_copy_(0, rows, teacher_hat[total - n:].to(self.teacher))
        self.student.index_copy_(0, rows, student_hat[total - n:].to(self.student))
        self.stamp.index_copy_(0, rows, stamps.to(self.stamp.device))
        self.filled = min(self.capacity, self.filled + n)
        self.count += total

    # -- checkpoint state ----------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"ptr": self.ptr, "filled": self.filled, "count": self.count}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        keys = {name: prefix + name for name in ("teacher", "student", "stamp", "_extra_state")}
        absent = [key for key in keys.values() if key not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return
        teacher, student, stamp = (state_dict[keys[n]] for n in ("teacher", "student", "stamp"))
        extra = state_dict[keys["_extra_state"]]
        if teacher.dim() != 2 or teacher.shape[1] != self.dim or student.shape != teacher.shape \
                or stamp.shape != teacher.shape[:1]:
            raise ObjectiveInputError(
                f"objective state '{keys['teacher']}' {shape_of(teacher)} / '{keys['student']}' "
                f"{shape_of(student)} / '{keys['stamp']}' {shape_of(stamp)} do not fit a bank of "
                f"embedding dim {self.dim}")
        self.load_rows(teacher, student, stamp, int(extra["ptr"]), int(extra["filled"]),
                       int(extra["count"]))

    @torch.no_grad()
    def load_rows(self, teacher: torch.Tensor, student: torch.Tensor, stamp: torch.Tensor,
                  ptr: int, filled: int, count: int) -> None:
        """Restore a saved bank; a different capacity keeps the newest ``min(filled, Q)`` rows."""
        if teacher.shape[0] == self.capacity:
            self.teacher.copy_(teacher)
            self.student.copy_(student)
            self.stamp.copy_(stamp)
            self.ptr, self.filled, self.count = ptr, filled, count
            return
        kept = min(filled, self.capacity)
        order = torch.argsort(stamp.cpu()[:filled])[filled - kept:]  # oldest kept row first
        self.teacher.zero_()
        self.student.zero_()
        self.stamp.fill_(-1)
        self.teacher[:kept] = teacher.cpu()[order].to(self.teacher)
        self.student[:kept] = student.cpu()[order].to(self.student)
        self.stamp[:kept] = stamp.cpu()[order].to(self.stamp)
        self.ptr, self.filled, self.count = kept % self.capacity, kept, count
