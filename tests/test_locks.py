"""Directory locks (``fr_distill.locks``): shared and exclusive holders, release, a link in the
lock file's place."""
from __future__ import annotations

import os

import pytest


def test_directory_locks_shared_exclusive_and_released(tmp_path):
    """fr_distill.locks: shared holders coexist and an exclusive request is refused naming
    none; an exclusive holder writes who it is and a shared request is refused naming it;
    released locks are taken again; a symbolic link in the lock file's place is refused."""
    from fr_distill import locks

    path = tmp_path / ".lock"
    readers = [locks.acquire(path, shared=True), locks.acquire(path, shared=True)]
    with pytest.raises(locks.LockBusy) as busy:
        locks.acquire(path)
    assert busy.value.holder is None and str(busy.value) == "processes sharing it"
    for fd in readers:
        locks.release(fd)
    writer = locks.acquire(path)
    assert locks.is_held(writer) and path.read_text().startswith(f"pid {os.getpid()} on ")
    with pytest.raises(locks.LockBusy) as busy:
        locks.acquire(path, shared=True)
    assert busy.value.holder == path.read_text()
    locks.release(writer)
    assert not locks.is_held(writer)
    locks.release(locks.acquire(path, shared=True))
    (tmp_path / "link").symlink_to(path)
    with pytest.raises(OSError):
        locks.acquire(tmp_path / "link")
