"""The training engine: the loop (:mod:`.trainer`, entry point :func:`.trainer.train`), its
step, callbacks, schedules, optimizer, fault handling and logging.

Only the fault constants are imported here, so that job scripts read ``REQUEUE_EXIT_CODE``
without loading torch models."""
from __future__ import annotations

from .faults import REQUEUE_EXIT_CODE, REQUEUE_MARKER, NonFiniteLossError, TrainingError

__all__ = ["REQUEUE_EXIT_CODE", "REQUEUE_MARKER", "NonFiniteLossError", "TrainingError"]
