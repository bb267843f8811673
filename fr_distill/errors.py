"""The project's one-line errors: one base class, with the exit status of the command line.

Every error meant for the user (bad input, a run that cannot go on) derives from
:class:`FrDistillError`: its message is one line naming the file, key, record or tensor at
fault, and ``exit_code`` is what the command exits with — 2 for input the user must fix, 1 for
a run that failed. The entry points catch this one class (:func:`exit_with`), nothing else.
"""
from __future__ import annotations

import sys


class FrDistillError(Exception):
    """A one-line error for the user; ``exit_code`` 2: bad input (the default), 1: failed run."""

    exit_code = 2


def exit_with(err: FrDistillError, prefix: str = "error") -> int:
    """Print ``err`` as one line on stderr and return its exit status."""
    print(f"{prefix}: {err}", file=sys.stderr)
    return err.exit_code


def first_line(err: BaseException) -> str:
    """``Type: first line of the message``: what a one-line error quotes of an exception
    raised by a library (whose message may span lines)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
