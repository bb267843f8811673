"""The cache on disk, and the rows a training step reads from it.

A cache directory holds ``embeddings.bin``, a C-ordered array ``[num_samples, flips, dim]``
of ``float16`` or ``float32`` (row ``[i, f]`` is sample ``i`` unflipped (``f = 0``) or
flipped (``f = 1``)), and ``manifest.json``: the identity of the rows
(:mod:`~fr_distill.teacher_cache.identity`), how they were computed, and a sha256 per shard
(a shard is ``shard_samples`` consecutive samples with all their flips: a contiguous byte
range). ``complete`` is true once every shard is written. The manifest is replaced
atomically after each shard, so an interrupted build resumes from the last shard recorded.
With ``teacher.cache_verify_content`` the directory also holds ``images.sha256``
(:mod:`~fr_distill.teacher_cache.content`).

The build allocates ``embeddings.bin`` in full first (:func:`allocate_rows`) and writes it
with ordinary writes (:class:`RowWriter`), never through a memory map: a full disk is a
one-line :class:`CacheWriteError` naming the file, not a SIGBUS. No file of the cache is
written through a symbolic link.

:func:`open_cache` refuses, with one line naming what differs, a cache built for another
teacher, other data, another preprocessing, dtype or embedding size, one that lacks the
flips the run reads, an incomplete, truncated or corrupt one (every shard's checksum is
verified, in threads, before training), or one whose manifest lacks a key its readers use
(:func:`read_manifest` names it). :class:`TeacherCache` then serves a step's rows.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fr_distill.paths import atomic_write
from fr_distill.teacher_cache.identity import CacheError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ROWS_FILE = "embeddings.bin"
FORMAT_VERSION = 1
DTYPES = {"float16": np.float16, "float32": np.float32}
#: ``teacher.cache_placement: auto`` puts the rows in device memory when they take at most
#: this share of the device's free memory.
AUTO_DEVICE_SHARE = 0.25
DEVICE_COPY_SAMPLES = 65536


class CacheWriteError(CacheError):
    """A file of the cache could not be written (a full disk, an I/O error): the build failed
    (exit 1); what the manifest recorded before stays valid."""

    exit_code = 1


def read_manifest(directory: Path) -> dict | None:
    """The manifest of ``directory``, None when there is none; a one-line error naming the
    manifest (and the key) when it is unreadable or lacks what a cache needs."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CacheError(f"{path}: not a readable teacher-cache manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "fr_distill.teacher_cache":
        raise CacheError(f"{path}: not a teacher-cache manifest (no format "
                         f"'fr_distill.teacher_cache')")
    if manifest.get("version") != FORMAT_VERSION:
        raise CacheError(f"{path}: teacher-cache format version {manifest.get('version')}, "
                         f"this fr_distill reads version {FORMAT_VERSION}; build it again")
    _check_fields(path, manifest)
    return manifest


def _is_count(minimum: int):
    return lambda v: type(v) is int and v >= minimum


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in HEX for c in value)


HEX = frozenset("0123456789abcdef")
#: Every manifest key the cache's readers and builds use, parents before children, with what
#: its value must be; ``image_digests`` may be absent (manifests written before it).
MANIFEST_FIELDS = (
    ("identity", lambda v: isinstance(v, dict), "a mapping"),
    ("identity.teacher", lambda v: isinstance(v, dict), "a mapping"),
    ("identity.teacher.sha256", _is_sha256, "a sha256 (64 hex digits)"),
    ("identity.teacher.architecture",
     lambda v: v is None or (isinstance(v, dict)
                             and {"name", "embedding_dim", "width"} <= v.keys()),
     "null or a mapping of name, embedding_dim and width"),
    ("identity.data", lambda v: isinstance(v, dict), "a mapping"),
    ("identity.data.format", lambda v: isinstance(v, str), "a string"),
    ("identity.data.num_samples", _is_count(1), "an integer >= 1"),
    ("identity.data.num_classes", _is_count(1), "an integer >= 1"),
    ("identity.data.digest", lambda v: isinstance(v, str), "a string"),
    ("identity.preprocessing", lambda v: isinstance(v, dict), "a mapping"),
    ("identity.preprocessing.decoder", lambda v: isinstance(v, str), "a string"),
    ("identity.preprocessing.pixels", lambda v: isinstance(v, str), "a string"),
    ("identity.preprocessing.teacher_input", lambda v: isinstance(v, list) and len(v) == 2,
     "a list [input_mean, input_std]"),
    ("identity.dtype", lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
    ("flips", lambda v: v in ([False], [False, True]), "[false] or [false, true]"),
    ("shard_samples", _is_count(1), "an integer >= 1"),
    ("embedding_dim", _is_count(1), "an integer >= 1"),
    ("shards", lambda v: isinstance(v, dict), "a mapping"),
    ("complete", lambda v: isinstance(v, bool), "true or false"),
    ("execution", lambda v: isinstance(v, dict), "a mapping"),
    ("teacher_check", lambda v: v is None or isinstance(v, dict), "null or a mapping"),
    ("nonfinite_rows", _is_count(0), "an integer >= 0"),
    ("build_seconds", lambda v: type(v) in (int, float), "a number"),
    ("image_digests", lambda v: v is None or _is_sha256(v), "null or a sha256 (64 hex digits)"),
)
OPTIONAL_FIELDS = {"image_digests"}


def _check_fields(path: Path, manifest: dict) -> None:
    """Refuse, naming the key, a manifest lacking a field or holding a value its readers
    cannot use (a traceback otherwise, e.g. a division by ``shard_samples: 0``)."""
    for key, valid, what in MANIFEST_FIELDS:
        *parents, name = key.split(".")
        holder = manifest
        for parent in parents:
            holder = holder[parent]
        if name not in holder:
            if key in OPTIONAL_FIELDS:
                continue
            raise CacheError(f"{path}: key '{key}' is missing; the manifest is damaged: build "
                             f"the cache again")
        if not valid(holder[name]):
            raise CacheError(f"{path}: key '{key}' must be {what}, not "
                             f"{json.dumps(holder[name])[:60]}; the manifest is damaged: build "
                             f"the cache again")
    num_shards = len(shard_ranges(manifest["identity"]["data"]["num_samples"],
                                  manifest["shard_samples"]))
    for shard, digest in manifest["shards"].items():
        if not (shard.isdigit() and shard == str(int(shard)) and int(shard) < num_shards
                and _is_sha256(digest)):
            raise CacheError(f"{path}: key 'shards.{shard}' must name one of the {num_shards} "
                             f"shards and hold its sha256; the manifest is damaged: build the "
                             f"cache again")


def write_manifest(directory: Path, manifest: dict) -> None:
    """Replace the manifest atomically (a new file, fsync, rename: never written through a
    link); a one-line :class:`CacheWriteError` naming it when it cannot be written."""
    write_file(directory / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def write_file(path: Path, data: bytes) -> None:
    """Replace the cache's file ``path`` atomically (mode 0644 less the umask, as the cache is
    often shared); :class:`CacheWriteError` naming ``path`` when it cannot be written."""
    try:
        atomic_write(path, data, mode=0o644)
    except OSError as err:
        raise CacheWriteError(cannot_write(path, err)) from None


def cannot_write(path: Path, err: OSError) -> str:
    """The line of a failed write of the cache's file ``path`` (a full disk, an I/O error)."""
    return (f"{path}: cannot be written ({err.strerror or err}); the shards already recorded "
            f"are kept: free space and run the same command to finish the build")


def row_shape(manifest: dict) -> tuple[int, int, int]:
    """``(num_samples, flips, dim)`` of the rows file."""
    return (manifest["identity"]["data"]["num_samples"], len(manifest["flips"]),
            manifest["embedding_dim"])


def expected_bytes(manifest: dict) -> int:
    count, flips, dim = row_shape(manifest)
    return count * flips * dim * np.dtype(DTYPES[manifest["identity"]["dtype"]]).itemsize


def shard_ranges(num_samples: int, shard_samples: int) -> list[tuple[int, int]]:
    """``[start, end)`` sample ranges of the shards."""
    return [(start, min(start + shard_samples, num_samples))
            for start in range(0, num_samples, shard_samples)]


def map_rows(directory: Path, manifest: dict) -> np.memmap:
    """The rows file as a read-only ``[num_samples, flips, dim]`` memory map."""
    return np.memmap(directory / ROWS_FILE, dtype=DTYPES[manifest["identity"]["dtype"]],
                     mode="r", shape=row_shape(manifest))


def shard_sha256(rows: np.memmap, start: int, end: int) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(rows[start:end])).cast("B")).hexdigest()


def refuse_link(path: Path) -> None:
    """A symbolic link in place of the cache's file ``path`` is refused in one line: a build
    writes its own directory's files, never another cache's through a link."""
    if path.is_symlink():
        raise CacheError(f"{path} is a symbolic link (to {os.readlink(path)}); a cache build "
                         f"does not write through links: remove it, or choose another "
                         f"teacher.cache")


def open_own(path: Path, flags: int) -> int:
    """Open the cache's file ``path`` for writing (not through a link: :func:`refuse_link`)."""
    refuse_link(path)
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise CacheWriteError(cannot_write(path, err)) from None


def allocate_rows(directory: Path, manifest: dict) -> None:
    """Create the rows file anew with all its bytes allocated on disk (``posix_fallocate``)
    before any row is computed: a disk without room is one line now, naming the file, not a
    SIGBUS when a row is stored. The old file is unlinked, not truncated, so a process still
    mapping it keeps the rows it had."""
    path, size = directory / ROWS_FILE, expected_bytes(manifest)
    refuse_link(path)
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        raise CacheWriteError(cannot_write(path, err)) from None
    fd = open_own(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        os.ftruncate(fd, 0)  # gives back what was allocated
        raise CacheWriteError(f"{path}: cannot allocate {size} bytes ({err.strerror}); no row "
                              f"was computed: free space or choose another teacher.cache") from None
    finally:
        os.close(fd)


class RowWriter:
    """Rank 0's writer of a build's rows: each batch of samples, all its flips together, with
    ordinary positioned writes into the allocated file (:func:`allocate_rows`), hashing each
    shard's bytes as they are written. A failed write (a full disk on a copy-on-write file
    system, an I/O error) is an ``OSError`` here, where through a memory map it was a SIGBUS
    that killed the build; it is kept until the shard ends, where :meth:`end_shard` raises it
    (the build's one collective per shard then stops every rank)."""

    def __init__(self, directory: Path, manifest: dict) -> None:
        self.path = directory / ROWS_FILE
        _, flips, dim = row_shape(manifest)
        self.sample_shape = (flips, dim)
        self.dtype = np.dtype(DTYPES[manifest["identity"]["dtype"]])
        self.fd = open_own(self.path, os.O_WRONLY)
        self.block, self.block_start = None, -1
        self.digest, self.error = hashlib.sha256(), None

    def put(self, start: int, flip: int, rows: np.ndarray) -> None:
        """Rows of samples ``start …`` with flip index ``flip``; a batch's rows are written
        once its last flip is in (the build's sweep gives a batch's flips in order)."""
        if start != self.block_start:
            self.block = np.empty((len(rows), *self.sample_shape), dtype=self.dtype)
            self.block_start = start
        self.block[:, flip] = rows
        if flip == self.sample_shape[0] - 1:
            self._write(start, self.block)

    def _write(self, start: int, block: np.ndarray) -> None:
        data = memoryview(block).cast("B")
        self.digest.update(data)
        offset = start * block[0].nbytes
        while data and self.error is None:
            try:
                written = os.pwrite(self.fd, data, offset)
            except OSError as err:
                self.error = err
            else:
                data, offset = data[written:], offset + written

    def end_shard(self) -> str:
        """The sha256 of the shard's rows, once they are on disk (fsync);
        :class:`CacheWriteError` naming the file when one of its writes failed."""
        try:
            if self.error is not None:
                raise self.error
            os.fsync(self.fd)
        except OSError as err:
            raise CacheWriteError(cannot_write(self.path, err)) from None
        digest, self.digest = self.digest.hexdigest(), hashlib.sha256()
        return digest

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def corrupt_shards(directory: Path, manifest: dict, shards: list[int]) -> list[int]:
    """The shards among ``shards`` whose bytes no longer match their recorded sha256."""
    rows = map_rows(directory, manifest)
    ranges = shard_ranges(row_shape(manifest)[0], manifest["shard_samples"])
    recorded = manifest["shards"]

    def bad(shard: int) -> bool:
        return shard_sha256(rows, *ranges[shard]) != recorded[str(shard)]

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib frees the GIL
        flags = list(pool.map(bad, shards))
    return [shard for shard, is_bad in zip(shards, flags) if is_bad]


def verify(directory: Path, manifest: dict) -> None:
    """Refuse an incomplete, truncated or corrupt cache (checksums of every shard)."""
    ranges = shard_ranges(row_shape(manifest)[0], manifest["shard_samples"])
    if not manifest.get("complete") or len(manifest["shards"]) != len(ranges):
        raise CacheError(f"teacher.cache {directory} is incomplete: {len(manifest['shards'])} of "
                         f"{len(ranges)} shards written; run fr-distill cache-teacher again to "
                         f"finish it")
    path = directory / ROWS_FILE
    size = path.stat().st_size if path.is_file() else None
    if size != expected_bytes(manifest):
        raise CacheError(f"{path}: {'missing' if size is None else f'{size} bytes'}, the manifest "
                         f"needs {expected_bytes(manifest)}; the file is truncated or from another "
                         f"build: build the cache again")
    started = time.perf_counter()
    bad = corrupt_shards(directory, manifest, list(range(len(ranges))))
    if bad:
        start, end = ranges[bad[0]]
        raise CacheError(f"{path}: shard {bad[0]} (samples {start}-{end - 1}) does not match its "
                         f"sha256 in {MANIFEST}: the file is corrupt; build the cache again")
    log.info("teacher cache %s: %d shards verified in %.1f s", directory, len(ranges),
             time.perf_counter() - started)


class TeacherCache:
    """The teacher's embeddings of a training set, looked up by (sample index, flip).

    ``placement``: ``host`` reads the rows from the memory-mapped file (the page cache) into
    pinned memory and copies them to the device without blocking; ``device`` loads the whole
    array into the device's memory once and gathers there; ``auto`` takes ``device`` on a GPU
    when the array needs at most ``AUTO_DEVICE_SHARE`` of its free memory, else ``host``.
    Rows come out as float32 ``[B, dim]``: a float32 cache gives the teacher's float32
    output unchanged.
    """

    def __init__(self, directory: Path, manifest: dict, device: torch.device,
                 placement: str = "auto") -> None:
        self.directory, self.manifest, self.device = directory, manifest, device
        self.rows = map_rows(directory, manifest)
        self.embedding_dim = manifest["embedding_dim"]
        self.flips = list(manifest["flips"])
        if placement == "auto":
            placement = "host"
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                placement = "device" if self.rows.nbytes <= AUTO_DEVICE_SHARE * free else "host"
        self.placement = placement
        self.on_device = None
        if placement == "device":  # copied in slices: no second host copy of the whole array
            dtype = {"float16": torch.float16, "float32": torch.float32}[
                manifest["identity"]["dtype"]]
            self.on_device = torch.empty(self.rows.shape, dtype=dtype, device=device)
            for start in range(0, self.rows.shape[0], DEVICE_COPY_SAMPLES):
                block = np.array(self.rows[start:start + DEVICE_COPY_SAMPLES])
                self.on_device[start:start + len(block)].copy_(torch.from_numpy(block))
        where = ("device memory" if self.on_device is not None else
                 "host memory (memory-mapped, copied through pinned memory)"
                 if device.type == "cuda" else "host memory (memory-mapped)")
        log.info("teacher cache %s: %d x %d x %d %s rows (%.2f GiB) in %s", directory,
                 *self.rows.shape, self.rows.dtype, self.rows.nbytes / 2 ** 30, where)

    def lookup(self, indices: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """float32 ``[B, dim]`` rows of samples ``indices`` (CPU int64) with ``flips`` (CPU bool),
        on the device (no host read of device data)."""
        which = flips.to(torch.int64) if len(self.flips) == 2 else torch.zeros_like(indices)
        if self.on_device is not None:
            return self.on_device[indices.to(self.device), which.to(self.device)].float()
        rows = torch.from_numpy(self.rows[indices.numpy(), which.numpy()])
        if self.device.type == "cuda":
            return rows.pin_memory().to(self.device, non_blocking=True).float()
        return rows.float()
