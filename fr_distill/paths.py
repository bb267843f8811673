"""Checks of the directories a command will write, made before its expensive work starts, and
the file helpers of the project's durable writes (checksums, directory fsync)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fr_distill.errors import FrDistillError


class NotWritableError(FrDistillError, OSError):
    """A directory a command must write to cannot be created or written (one line, exit 2)."""


def require_writable_dir(directory: str | os.PathLike, what: str) -> None:
    """Create ``directory`` if needed and write and remove a file in it; raise
    :class:`NotWritableError` naming ``what`` (a config key or an option) otherwise."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotWritableError(f"{what}: {directory} is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_test.{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise NotWritableError(f"{what}: cannot write to {directory} "
                               f"({err.strerror or type(err).__name__})") from None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The sha256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of directory ``path`` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
