"""The cache on disk, and the rows a training step reads from it.

A cache directory holds ``embeddings.bin``, a C-ordered array ``[num_samples, flips, dim]``
of ``float16`` or ``float32`` (row ``[i, f]`` is sample ``i`` unflipped (``f = 0``) or
flipped (``f = 1``)), and ``manifest.json``: the identity of the rows
(:mod:`~fr_distill.teacher_cache.identity`), how they were computed, and a sha256 per shard
(a shard is ``shard_samples`` consecutive samples with all their flips: a contiguous byte
range). ``complete`` is true once every shard is written. The manifest is replaced
atomically after each shard, so an interrupted build resumes from the last shard recorded.

:func:`open_cache` refuses, with one line naming what differs, a cache built for another
teacher, other data, another preprocessing, dtype or embedding size, one that lacks the
flips the run reads, an incomplete, truncated or corrupt one (every shard's checksum is
verified, in threads, before training). :class:`TeacherCache` then serves a step's rows.
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


def read_manifest(directory: Path) -> dict | None:
    """The manifest of ``directory``, None when there is none; a one-line error when unreadable."""
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
    return manifest


def write_manifest(directory: Path, manifest: dict) -> None:
    """Replace the manifest atomically (write, fsync, rename)."""
    path = directory / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def map_rows(directory: Path, manifest: dict, mode: str = "r") -> np.memmap:
    """The rows file as a ``[num_samples, flips, dim]`` memory map."""
    return np.memmap(directory / ROWS_FILE, dtype=DTYPES[manifest["identity"]["dtype"]],
                     mode=mode, shape=row_shape(manifest))


def shard_sha256(rows: np.memmap, start: int, end: int) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(rows[start:end])).cast("B")).hexdigest()


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
