"""Fault handling of a training run: preemption signals and non-finite losses.

* **Preemption** (SLURM sends SIGTERM, or SIGUSR1 with ``--signal``): :class:`StopSignal`
  records the signal; the loop agrees on it across ranks with one all-reduce per step, so
  every rank finishes the same step, writes the same checkpoint and exits with
  :data:`REQUEUE_EXIT_CODE`. Rank 0 also leaves a :data:`REQUEUE_MARKER` file in the run
  directory, because ``torchrun`` reports its own exit status, not the workers'.
* **Non-finite loss**: :class:`NonFiniteGuard` counts consecutive skipped steps and stops the
  run with :class:`NonFiniteLossError` (one line naming the step and the terms) after
  ``run.max_nonfinite_steps`` of them in a row; the last checkpoint is left untouched.
"""
from __future__ import annotations

import signal
import types

from fr_distill.errors import FrDistillError

#: Exit status of a worker that stopped on SIGTERM/SIGUSR1 after checkpointing: sysexits.h's
#: ``EX_TEMPFAIL`` ("temporary failure, try again"); job scripts requeue on it.
REQUEUE_EXIT_CODE = 75

#: Name of the file rank 0 writes into ``run.output_dir`` when the run stopped for requeueing.
REQUEUE_MARKER = "REQUEUE"

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingError(FrDistillError, RuntimeError):
    """A training run cannot go on; the message is one line."""

    exit_code = 1


class NonFiniteLossError(TrainingError):
    """Too many consecutive steps with a non-finite loss."""


class StopSignal:
    """Remembers a SIGTERM/SIGUSR1 until the loop reaches the end of its current step.

    A context manager: the previous handlers are restored on exit.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.received = signum

    @property
    def pending(self) -> bool:
        return self.received is not None

    def __enter__(self) -> "StopSignal":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class NonFiniteGuard:
    """Counts skipped non-finite steps: in total, and in a row up to ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def record(self, step: int, bad_terms: list[str]) -> None:
        """Count a skipped step; raise :class:`NonFiniteLossError` at ``limit`` in a row."""
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            terms = ", ".join(bad_terms) or "total"
            raise NonFiniteLossError(
                f"non-finite loss at step {step} ({self.in_a_row} steps in a row, limit "
                f"run.max_nonfinite_steps={self.limit}); non-finite terms: {terms}")

    def reset(self) -> None:
        self.in_a_row = 0

    def state_dict(self) -> dict:
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.in_a_row = int(state["total"]), int(state["in_a_row"])
