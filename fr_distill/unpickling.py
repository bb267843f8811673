"""Reading pickles without running code from them.

A pickle names the callables that rebuild its objects (``GLOBAL``/``STACK_GLOBAL``) and calls
them (``REDUCE``, ``NEWOBJ``, ``BUILD``), so unpickling a file with :func:`pickle.load` runs
whatever it names, ``os.system`` included. :class:`AllowlistUnpickler` resolves only the
globals a format needs and refuses any other before it is called; the `.bin` sets of
evaluation (:mod:`fr_distill.eval.safe_pickle`) and the index of a sharded checkpoint
(:mod:`fr_distill.checkpoint.sharded`) are read with it. Weights and checkpoints are
read with ``torch.load(weights_only=True)``, torch's own allowlist. :func:`refusal` says in
one line which global either refused, for the project's one-line errors, which never repeat
torch's advice to retry with ``weights_only=False``.
"""
from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from typing import Any

# torch < 2.6: "Unsupported global: GLOBAL x.y"; torch 2.14: "unsupported GLOBAL x.y whose
# module x is blocked" (or "... was not an allowed global")
_TORCH_REFUSAL = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)")


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle refers to a global outside the allowlist (nothing of it was called);
    ``name`` is the global, ``source`` the file where the reader names it."""

    def __init__(self, name: str, source: str | None = None) -> None:
        super().__init__(f"global '{name}' is not allowed")
        self.name, self.source = name, source


class AllowlistUnpickler(pickle.Unpickler):
    """An unpickler resolving the globals of :attr:`allowed` (``(module, name)`` → the object
    the pickle gets) and refusing every other with :class:`RefusedGlobal`."""

    allowed: Mapping[tuple[str, str], Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise RefusedGlobal(f"{module}.{name}")
        return self.allowed[(module, name)]


def refused_global(err: BaseException) -> str | None:
    """The global (``posix.system``) whose refusal ``err`` is: by an
    :class:`AllowlistUnpickler` or by ``torch.load(weights_only=True)``; else ``None``."""
    if isinstance(err, RefusedGlobal):
        return err.name
    match = _TORCH_REFUSAL.search(str(err)) if isinstance(err, pickle.UnpicklingError) else None
    return match.group(1) if match else None


def refusal(err: BaseException, source: str | None = None) -> str | None:
    """``refusing to unpickle code from SOURCE: it references posix.system`` when ``err`` is
    the refusal of a global (``source``: the file read, else the one ``err`` names, else
    none), else ``None``."""
    name = refused_global(err)
    if name is None:
        return None
    source = source or getattr(err, "source", None)
    return f"refusing to unpickle code{f' from {source}' if source else ''}: it references {name}"
