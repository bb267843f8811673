"""Checks of the directories a command will write, made before its expensive work starts, the
file helpers of the project's durable writes (the one atomic write, checksums, directory
fsync), and the one way input files are opened (regular files only)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from fr_distill.errors import FrDistillError


class NotWritableError(FrDistillError, OSError):
    """A directory a command must write to cannot be created or written (one line, exit 2)."""


def _write_probe(directory: Path) -> None:
    """Write and remove a small file in ``directory`` (an ``OSError`` when it cannot be written)."""
    probe = directory / f".write_test.{os.getpid()}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"ok")
    finally:
        os.close(fd)
        os.unlink(probe)


def require_writable_dir(directory: str | os.PathLike, what: str) -> None:
    """Create ``directory`` if needed and write and remove a file in it; raise
    :class:`NotWritableError` naming ``what`` (a config key or an option) otherwise."""
    directory = Path(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotWritableError(f"{what}: {directory} is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_probe(directory)
    except OSError as err:
        raise NotWritableError(f"{what}: cannot write to {directory} "
                               f"({err.strerror or type(err).__name__})") from None


def require_writable_file(path: str | os.PathLike, what: str) -> None:
    """Check that the file ``path`` can be written (created in its existing directory, or
    replaced), without creating anything: :class:`NotWritableError` naming ``what`` and the
    path otherwise (a read-only file system, a missing or unwritable directory, a name the
    file system refuses)."""
    path = Path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        _write_probe(path.parent)
    except OSError as err:
        raise NotWritableError(f"{what}: cannot write {path} "
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


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: int = 0o666) -> Iterator[BinaryIO]:
    """A binary file whose content replaces ``path`` when the ``with`` block ends without an
    exception, so that ``path`` holds either its old or its new content, never a part.

    The content goes to a new temporary file beside ``path`` (a name of its own, created
    exclusively with ``mode`` less the umask, never following a link), is fsynced, renamed over
    ``path``, and the directory fsynced; on any exception the temporary file is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a read-only file system refuses even this
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes, mode: int = 0o666) -> None:
    """Write the bytes ``data`` to ``path`` atomically (:func:`atomic_writer`)."""
    with atomic_writer(path, mode) as handle:
        handle.write(data)


_SPECIAL_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                  (stat.S_ISSOCK, "a socket"))


class NotRegularFileError(OSError):
    """An input path that is no regular file (a FIFO, a device, a socket, a directory); its
    ``strerror`` says which, e.g. ``a FIFO, not a regular file``."""


def _refuse_special(mode: int, path: str | os.PathLike) -> None:
    """Raise :class:`NotRegularFileError` naming the kind of ``path`` unless its ``st_mode``
    ``mode`` is a regular file's."""
    for test, kind in _SPECIAL_KINDS:
        if test(mode):
            raise NotRegularFileError(errno.EINVAL, f"{kind}, not a regular file", str(path))
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(errno.EINVAL, "not a regular file", str(path))


def check_regular(path: str | os.PathLike) -> None:
    """Raise :class:`NotRegularFileError` unless ``path`` is a regular file once links are
    followed (``os.stat``'s own ``OSError`` for a missing file or a dangling link)."""
    _refuse_special(os.stat(path).st_mode, path)


def open_regular(path: str | os.PathLike, buffering: int = -1) -> BinaryIO:
    """``path`` opened for binary reading, if it is a regular file once links are followed.

    A FIFO blocks its reader until a writer comes (forever), a device such as ``/dev/zero``
    never ends, a socket cannot be read as a file: such a path (or a link to one) raises
    :class:`NotRegularFileError` (an ``OSError``, so callers name the file as for any unreadable
    one) before anything is read. ``os.stat`` decides before the open (opening a device can
    have effects of its own); the open file is checked again, opened non-blocking, so a FIFO
    put in its place in between neither blocks nor is read.
    """
    check_regular(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        _refuse_special(os.fstat(fd).st_mode, path)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike) -> bytes:
    """The bytes of the regular file ``path`` (:func:`open_regular`)."""
    with open_regular(path) as handle:
        return handle.read()
