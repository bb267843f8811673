"""The evaluation package's error type."""
from __future__ import annotations

from fr_distill.errors import FrDistillError


class EvalDataError(FrDistillError, ValueError):
    """Bad evaluation input (a `.bin` file, an IJB meta file, a pair list): one line naming the
    file and the line, record or key at fault, raised before any expensive work."""
