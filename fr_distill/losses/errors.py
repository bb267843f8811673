"""The one exception the objective raises for bad input or an incompatible saved state."""
from __future__ import annotations

from fr_distill.errors import FrDistillError


class ObjectiveInputError(FrDistillError, ValueError):
    """Bad input to the objective; the message is one line naming the tensor and its shape.

    Raised before any loss is computed, so the trainer can decide to skip the step.
    """

    exit_code = 1


def shape_of(tensor) -> str:
    """``[64, 512]``-style text for messages."""
    return "[" + ", ".join(str(n) for n in tensor.shape) + "]"
