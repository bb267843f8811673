"""Who may use a cache directory: runs reading it share it, a build has it alone.

Rank 0 of a run reading ``teacher.cache`` holds a shared ``flock`` on ``<cache>/.lock`` from
:func:`~fr_distill.teacher_cache.open_cache` until the run ends; ``fr-distill cache-teacher``
holds it exclusively for the whole build and writes who it is (pid, host, start time) into
the file. So a build (``--force`` or not) refuses a cache a run is reading, instead of
rewriting the rows under it (a run then read zero rows, silently), and a run refuses a cache
being built. The lock dies with its process: a crash leaves no stale lock. A ``flock``
belongs to the open file description, which a child shares, so the file is opened with
``O_CLOEXEC`` (a program the process executes never gets it) and a forked child (a
DataLoader or DALI worker) closes it first thing (:func:`_close_in_child`): a killed run's
workers do not keep its cache locked. ``O_NOFOLLOW``: a symbolic link in the lock file's
place is refused, not written through.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
from pathlib import Path

from fr_distill.teacher_cache.identity import CacheError

LOCK_FILE = ".lock"

_held: dict[tuple[Path, int], list[int]] = {}  # (cache directory, mode) -> this process's lock fds


def lock_cache(directory: Path, mode: int) -> None:
    """Take ``directory``'s lock, ``fcntl.LOCK_SH`` (a run reading the cache) or
    ``fcntl.LOCK_EX`` (a build writing it), until :func:`release_cache`; without waiting: a
    one-line :class:`CacheError` naming the cache and what holds it when it is taken."""
    path = directory / LOCK_FILE
    access = os.O_RDWR if mode == fcntl.LOCK_EX else os.O_RDONLY
    try:
        fd = os.open(path, access | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise CacheError(f"teacher.cache {directory}: cannot open its lock file {path} "
                         f"({err.strerror})") from None
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        message = _in_use(directory, fd, mode)
        os.close(fd)
        raise CacheError(message) from None
    except OSError as err:
        os.close(fd)
        raise CacheError(f"teacher.cache {directory}: cannot lock {path} ({err.strerror}); "
                         f"the file system does not support flock") from None
    if mode == fcntl.LOCK_EX:
        started = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}".encode(), 0)
    _held.setdefault((Path(directory), mode), []).append(fd)


def _in_use(directory: Path, fd: int, mode: int) -> str:
    """The refusal when the lock ``mode`` on ``fd`` is taken: by a build when not even a shared
    lock can be had (the file names it), else by runs reading the cache."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
        if mode == fcntl.LOCK_EX:
            return (f"teacher.cache {directory} is in use by another cache build ({holder}); "
                    f"wait for it, stop it, or choose another teacher.cache")
        return (f"teacher.cache {directory} is being written by a cache build ({holder}); wait "
                f"for it to finish, or stop it")
    return (f"teacher.cache {directory} is in use: a training run is reading it; a build would "
            f"change the rows under that run: wait for the run to end or stop it, or choose "
            f"another teacher.cache")


def release_cache(directory: str | os.PathLike, mode: int) -> None:
    """Release the ``mode`` locks this process took on ``directory`` (at the end of a run:
    ``LOCK_SH``, of a build: ``LOCK_EX``; a build refused inside a run's process, as in the
    tests, leaves the run's lock alone)."""
    for fd in _held.pop((Path(directory), mode), []):
        os.close(fd)


def _close_in_child() -> None:
    """In a freshly forked child: close the inherited lock descriptors, so that a lock stays
    the process's that took it and ends with it."""
    for fds in _held.values():
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)
