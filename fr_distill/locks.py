"""Directory locks (``flock`` on a lock file) that this process alone holds, so they die with it.

A run holds ``run.output_dir/.lock`` exclusively (:mod:`fr_distill.engine.run_dir`), a
teacher-cache build ``teacher.cache/.lock``; readers of a directory may share its lock.
:func:`acquire` takes one without waiting, :func:`release` gives it back, and the end of the
process, however it ends, releases it too: a crashed or SIGKILLed holder leaves no stale lock.

Why ``flock``, closed in forked children:

* ``flock`` belongs to the open file description, and ``fork()`` shares that with the child.
  A child forked after the lock was taken (DALI's Python workers, anything forked without
  exec) kept the lock alive when its parent was SIGKILLed, and every rerun was refused as
  long as the orphan lived. So the file is opened close-on-exec (a spawned, forkserver or
  ``subprocess`` child never gets it) and every forked child closes the descriptors of the
  held locks first thing (:func:`_close_in_forked_child`, an ``os.register_at_fork`` hook):
  the open file description keeps one reference, this process's, and the lock ends with
  it. A child forked in the instant before the SIGKILL closes its copy as its first step.
* Not POSIX record locks (``fcntl``), which fork does not share: they are dropped when the
  process closes *any* descriptor of the file (a probe, a reader), do not exclude each other
  within one process (a reader and a writer of one directory in one process) and do not see
  the ``flock`` of ``flock(1)`` or of an earlier version of this program. Not OFD locks:
  fork shares them as it shares ``flock``. Not a lock taken after the workers start:
  workers also start later (evaluation, a loader started again).
* A child forked by C code without Python's fork hooks and without exec (none of the
  project's libraries does so) would still share the lock.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
from pathlib import Path

_held: set[int] = set()  # descriptors of the locks this process holds (none in a forked child)


class LockBusy(Exception):
    """Another process holds the lock. ``holder``: what an exclusive holder wrote in the file
    (pid, host, start time), None when only shared holders (who write nothing) have it."""

    def __init__(self, holder: str | None) -> None:
        super().__init__(holder or "processes sharing it")
        self.holder = holder


class FlockUnsupported(OSError):
    """The file system refuses ``flock`` (some NFS mounts)."""


def acquire(path: Path, shared: bool = False) -> int:
    """Lock ``path`` (created if missing; a symbolic link is refused) without waiting:
    ``shared`` with other shared holders, else exclusively, writing this process's pid, host
    and start time into the file. Returns the descriptor, held until :func:`release` or the
    end of the process. Raises :class:`LockBusy`, :class:`FlockUnsupported`, or the
    ``OSError`` of opening the file."""
    access = os.O_RDONLY if shared else os.O_RDWR
    fd = os.open(path, access | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _exclusive_holder(fd)
        os.close(fd)
        raise LockBusy(holder) from None
    except OSError as err:
        os.close(fd)
        raise FlockUnsupported(err.errno, err.strerror) from None
    _held.add(fd)
    if not shared:
        started = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}".encode(), 0)
    return fd


def _exclusive_holder(fd: int) -> str | None:
    """Who holds the lock that ``fd`` could not take: the line its exclusive holder wrote
    when not even a shared lock can be had, else None (shared holders only)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
    fcntl.flock(fd, fcntl.LOCK_UN)
    return None


def is_held(fd: int | None) -> bool:
    """Whether this process holds the lock :func:`acquire` returned ``fd`` for (a forked child
    holds none of its parent's)."""
    return fd in _held


def release(fd: int | None) -> None:
    """Give back the lock :func:`acquire` returned ``fd`` for (nothing if not held here)."""
    if fd in _held:
        _held.discard(fd)
        os.close(fd)


def _close_in_forked_child() -> None:
    """In a freshly forked child: close the inherited descriptors of the held locks, so the
    locks stay the parent's alone and end with it."""
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_forked_child)
