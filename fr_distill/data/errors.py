"""The data package's exception: bad training data reported in one line naming the file/record."""
from __future__ import annotations

from fr_distill.errors import FrDistillError


class DataError(FrDistillError, ValueError):
    """Unusable training data; the message is one line naming the file, record or key."""


def from_worker(err: BaseException, context: str) -> DataError:
    """One-line :class:`DataError` for an exception re-raised from a loader worker.

    DALI and DataLoader workers hand errors back as multi-line traceback text; a
    ``DataError`` raised in the worker is recovered verbatim, anything else is summarized by
    its last meaningful line, prefixed with ``context``.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in reversed(lines):
        if "DataError: " in line:
            return DataError(line.split("DataError: ", 1)[1])
    meaningful = [line for line in lines if not line.startswith(("Current pipeline", "File ", "^"))]
    return DataError(f"{context}: {meaningful[-1] if meaningful else type(err).__name__}")
