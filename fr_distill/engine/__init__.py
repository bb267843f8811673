"""The training engine: the loop (:mod:`.trainer`), checkpoints, schedules,
optimizer, fault handling and logging. Entry point: :func:`train`."""
from __future__ import annotations

from .faults import REQUEUE_EXIT_CODE, REQUEUE_MARKER, NonFiniteLossError, TrainingError

__all__ = ["REQUEUE_EXIT_CODE", "REQUEUE_MARKER", "NonFiniteLossError", "TrainingError", "train",
           "TrainResult", "dry_run"]


def __getattr__(name: str):
    # The trainer imports every other package; loading it lazily keeps ``fr_distill.engine``
    # importable for its constants (job scripts read REQUEUE_EXIT_CODE) without torch models.
    if name in ("train", "TrainResult"):
        from . import trainer
        return getattr(trainer, name)
    if name == "dry_run":
        from .plan import dry_run
        return dry_run
    raise AttributeError(name)
