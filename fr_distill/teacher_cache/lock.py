"""Who may use a cache directory: runs reading it share it, a build has it alone.

Rank 0 of a run reading ``teacher.cache`` holds a shared ``flock`` on ``<cache>/.lock`` from
:func:`~fr_distill.teacher_cache.open_cache` until the run ends; ``fr-distill cache-teacher``
holds it exclusively for the whole build and writes who it is (pid, host, start time) into
the file. So a build (``--force`` or not) refuses a cache a run is reading, instead of
rewriting the rows under it (a run then read zero rows, silently), and a run refuses a cache
being built. The lock is :mod:`fr_distill.locks`'s: it dies with its process (a forked DataLoader or DALI
worker never holds it), and a symbolic link in the lock file's place is refused, not
written through.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from fr_distill import locks
from fr_distill.teacher_cache.identity import CacheError

LOCK_FILE = ".lock"

_held: dict[tuple[Path, int], list[int]] = {}  # (cache directory, mode) -> this process's lock fds


def lock_cache(directory: Path, mode: int) -> None:
    """Take ``directory``'s lock, ``fcntl.LOCK_SH`` (a run reading the cache) or
    ``fcntl.LOCK_EX`` (a build writing it), until :func:`release_cache`; without waiting: a
    one-line :class:`CacheError` naming the cache and what holds it when it is taken."""
    path = directory / LOCK_FILE
    try:
        fd = locks.acquire(path, shared=mode == fcntl.LOCK_SH)
    except locks.LockBusy as busy:
        raise CacheError(_in_use(directory, busy.holder, mode)) from None
    except locks.FlockUnsupported as err:
        raise CacheError(f"teacher.cache {directory}: cannot lock {path} ({err.strerror}); "
                         f"the file system does not support flock") from None
    except OSError as err:
        raise CacheError(f"teacher.cache {directory}: cannot open its lock file {path} "
                         f"({err.strerror})") from None
    _held.setdefault((Path(directory), mode), []).append(fd)


def _in_use(directory: Path, holder: str | None, mode: int) -> str:
    """The refusal when the lock ``mode`` is taken: by a build (``holder``, the line it wrote in
    the file), else by runs reading the cache."""
    if holder is not None:
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
        locks.release(fd)
