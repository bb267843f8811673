"""``fr-distill cache-teacher``: the teacher's embedding of every training sample, computed once.

With a horizontal flip as the only augmentation, the teacher's embedding of a training
sample depends on nothing but the sample and its flip, so a run can read it instead of
running the teacher every step (``teacher.cache``). The build runs under torchrun like
training: each global batch of the sweep is split over the ranks, each rank runs the teacher
on its slice through the very code training uses (the run's loader and decoder,
:func:`fr_distill.models.teacher.teacher_embeddings` at ``precision.amp``, the same memory
layout and per-rank batch ``data.batch_size``), rank 0 gathers the rows and writes them.

Exactness: a CPU or GPU convolution may give a sample other last bits in a batch of another
size (the kernels block by batch size), never in another batch of the same size. So every
batch of the build holds exactly ``data.batch_size`` samples per rank (a shard's last batch
is padded with its last sample), and a run with that per-rank batch, precision and memory
layout reads rows bitwise equal to the teacher's output on the fly (float32 rows). The
manifest records these settings, and a run with other ones is told its rows may differ in
the last bits.

Resumable: rows are written shard by shard (``--shard-samples`` consecutive samples, all
flips) into a rows file allocated in full before the sweep, and the manifest, with each
finished shard's sha256, is replaced atomically once the shard is on disk; an interrupted
build started again verifies the shards it recorded and computes the rest. A directory
holding a cache of another identity is refused unless ``--force``. The build holds the
cache's lock exclusively (:mod:`.lock`): it refuses a cache a run is reading.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from pathlib import Path

import numpy as np
import torch

from fr_distill import dist, precision
from fr_distill.config import Config
from fr_distill.data import DatasetInfo, TrainLoader
from fr_distill.data.loader import select_backend
from fr_distill.errors import FrDistillError
from fr_distill.eval.teacher_check import check_sets, check_teacher
from fr_distill.models import FrozenTeacher
from fr_distill.models.teacher import teacher_embeddings
from fr_distill.paths import file_sha256, require_writable_dir
from fr_distill.teacher_cache.identity import (CacheError, execution, execution_differences,
                                               first_difference, flips_of, identity)
from fr_distill.teacher_cache.content import content_difference, record_digests
from fr_distill.teacher_cache.lock import lock_cache
from fr_distill.teacher_cache.store import (FORMAT_VERSION, ROWS_FILE, CacheWriteError, RowWriter,
                                            allocate_rows, corrupt_shards, expected_bytes,
                                            read_manifest, refuse_link, shard_ranges,
                                            write_manifest)

log = logging.getLogger(__name__)

DEFAULT_SHARD_SAMPLES = 65536


class SweepOrder:
    """The build's order, shaped like :class:`~fr_distill.data.sampler.GlobalSampler` for the
    training loaders: the samples of each pending shard in consecutive global batches (a
    shard's last batch padded with its last sample), each batch once per flip."""

    def __init__(self, shards: list[tuple[int, int]], flips: list[bool], global_batch: int):
        self.global_batch = global_batch
        self.steps = [(start, min(start + global_batch, end), flip) for first, end in shards
                      for start in range(first, end, global_batch) for flip in flips]
        self.steps_per_epoch = max(1, len(self.steps))

    def spec(self, step: int) -> tuple[int, int, bool]:
        """``(first sample, end, flip)`` of ``step`` (the last step again past the end, which
        loaders prefetching ahead may ask for)."""
        return self.steps[min(step, len(self.steps) - 1)]

    def global_indices(self, step: int) -> np.ndarray:
        start, end, _ = self.spec(step)
        indices = np.arange(start, end, dtype=np.int64)
        return np.concatenate([indices, np.full(self.global_batch - len(indices), end - 1,
                                                dtype=np.int64)])

    def rank_indices(self, step: int, rank: int, world_size: int) -> np.ndarray:
        per_rank = self.global_batch // world_size
        return self.global_indices(step)[rank * per_rank:(rank + 1) * per_rank]

    def flips(self, step: int, indices: np.ndarray) -> np.ndarray:
        return np.full(len(indices), self.spec(step)[2], dtype=bool)


def check_request(cfg: Config, shard_samples: int) -> None:
    """Refuse a build that names no teacher, no cache directory or a shard size below 1, in
    one line, before the pre-flight."""
    if not cfg.teacher.path:
        raise CacheError("config key 'teacher.path' is empty: name the teacher to cache")
    if not cfg.teacher.cache:
        raise CacheError("config key 'teacher.cache' is empty: name the directory the cache is "
                         "written to (training reads it with the same key)")
    if shard_samples < 1:
        raise CacheError(f"--shard-samples must be >= 1, got {shard_samples}")


def _prepare(cfg: Config, info: DatasetInfo, directory: Path, run_identity: dict, layout: dict,
             settings: dict, num_shards: int, force: bool) -> tuple[dict, list[int]]:
    """Rank 0: lock ``directory`` and read or start its manifest; returns the manifest and
    the shards still to compute. ``layout``: flips, shard size and embedding size of the
    rows; ``settings``: how they are computed (:func:`~.identity.execution`)."""

    require_writable_dir(directory, "config key 'teacher.cache'")
    lock_cache(directory, fcntl.LOCK_EX)  # held until the build ends (engine.cache_teacher)
    refuse_link(directory / ROWS_FILE)
    manifest = None if force else read_manifest(directory)
    if manifest is None:
        manifest = {"format": "fr_distill.teacher_cache", "version": FORMAT_VERSION,
                    "identity": run_identity, "teacher_file": cfg.teacher.path,
                    "data_train": cfg.data.train, **layout, "execution": settings,
                    "teacher_check": None, "shards": {}, "complete": False,
                    "nonfinite_rows": 0, "build_seconds": 0.0, "image_digests": None}
        _record_content(cfg, info, directory, manifest)
        write_manifest(directory, manifest)  # first: an older cache's manifest no longer holds
        allocate_rows(directory, manifest)
        return manifest, list(range(num_shards))
    problem = first_difference(manifest["identity"], run_identity, str(directory), cfg)
    changed = execution_differences({**manifest["execution"], **{k: manifest[k] for k in layout}},
                                    {**settings, **layout})
    if changed and not problem:
        problem = f"teacher.cache {directory} was being built with other settings ({', '.join(changed)})"
    if problem:
        raise CacheError(f"{problem}; finish it with the same settings, or pass --force to "
                         f"build it again from scratch")
    if _record_content(cfg, info, directory, manifest):
        write_manifest(directory, manifest)
    return manifest, _resume(directory, manifest, num_shards)


def _resume(directory: Path, manifest: dict, num_shards: int) -> list[int]:
    """The shards of a started build still to compute: those not recorded, and recorded ones
    whose bytes no longer match their sha256 (all of them when the rows file has not its size,
    which is then allocated anew)."""
    done = [int(shard) for shard in manifest["shards"]]
    rows_file = directory / ROWS_FILE
    intact = rows_file.is_file() and rows_file.stat().st_size == expected_bytes(manifest)
    bad = corrupt_shards(directory, manifest, done) if intact else done
    if bad:
        log.warning("teacher cache %s: %d recorded shards do not match their sha256 and are "
                    "computed again", directory, len(bad))
        for shard in bad:
            del manifest["shards"][str(shard)]
    pending = [s for s in range(num_shards) if str(s) not in manifest["shards"]]
    if bad or manifest["complete"] != (not pending):  # complete: stopped after its last shard
        manifest["complete"] = not pending
        write_manifest(directory, manifest)
    if not intact:
        allocate_rows(directory, manifest)
    if pending:
        log.info("teacher cache %s: resuming, %d of %d shards to compute", directory,
                 len(pending), num_shards)
    return pending


def _record_content(cfg: Config, info: DatasetInfo, directory: Path, manifest: dict) -> bool:
    """With ``teacher.cache_verify_content``: refuse a cache begun from images with other
    bytes, or record the images' digests in one that has none (:mod:`.content`); returns
    whether ``manifest`` changed."""
    if not cfg.teacher.cache_verify_content:
        return False
    if manifest.get("image_digests"):
        problem = content_difference(directory, manifest["image_digests"], info)
        if problem:
            raise CacheError(f"{problem}; pass --force to build it again from these images")
        return False
    started = time.perf_counter()
    manifest["image_digests"] = record_digests(directory, info)
    log.info("teacher cache %s: sha256 of %d images recorded in %.1f s", directory,
             info.num_samples, time.perf_counter() - started)
    return True


def build_rows(cfg: Config, info: dist.DistInfo, data_info: DatasetInfo, teacher: FrozenTeacher,
               shard_samples: int, force: bool) -> dict:
    """Build (or finish) the cache ``teacher.cache`` of ``teacher`` over the checked training
    data ``data_info`` on the process group ``info``; returns its manifest. The caller holds
    the process group and ran the pre-flight (:func:`fr_distill.engine.cache_teacher.build_cache`)."""
    device, directory = info.device, Path(cfg.teacher.cache)
    amp_dtype = precision.amp_dtype(cfg.precision.amp, device)
    memory_format = precision.image_layout(cfg.model.channels_last, device)
    shards = shard_ranges(data_info.num_samples, shard_samples)
    layout = {"flips": flips_of(cfg), "shard_samples": shard_samples,
              "embedding_dim": teacher.embedding_dim}

    def prepare():
        run_identity = identity(cfg, data_info, device, file_sha256(cfg.teacher.path),
                                teacher.built_from_keys)
        return _prepare(cfg, data_info, directory, run_identity, layout,
                        execution(cfg, device, cfg.data.batch_size), len(shards), force)

    outcome = None
    if info.is_main:
        try:
            outcome = prepare()
        except FrDistillError as err:
            outcome = err
    outcome = dist.broadcast_object(outcome)
    if isinstance(outcome, FrDistillError):
        raise outcome
    manifest, pending = outcome
    if not pending:
        log.info("teacher cache %s is complete and verified: nothing to do", directory)
        return manifest
    if manifest["teacher_check"] is None and check_sets(cfg):
        manifest["teacher_check"] = check_teacher(teacher, cfg, device, amp_dtype)
    if cfg.teacher.compile:
        teacher = torch.compile(teacher)

    started = time.perf_counter()
    global_batch = cfg.data.batch_size * info.world_size
    flips = layout["flips"]
    order = SweepOrder([shards[s] for s in pending], flips, global_batch)
    loader = TrainLoader(data_info, order, select_backend(cfg.data.loader), info.rank,
                         info.world_size, device, cfg.data.num_workers, cfg.data.prefetch)
    batches = loader.iterate(0)
    shard_of_step = [next(s for s in pending if shards[s][0] <= start < shards[s][1])
                     for start, _, _ in order.steps]
    images_done, seconds_before = 0, manifest["build_seconds"]
    with RowWriter(directory, manifest) if info.is_main else contextlib.nullcontext() as writer:
        for step, (start, end, flip) in enumerate(order.steps):
            batch = next(batches)
            f_t = teacher_embeddings(teacher, batch.images.contiguous(memory_format=memory_format),
                                     device, amp_dtype)
            gathered = dist.all_gather_cat(f_t)
            images_done += gathered.shape[0]
            if info.is_main:
                # float16 may overflow: counted
                block = gathered[:end - start].cpu().numpy().astype(writer.dtype)
                manifest["nonfinite_rows"] += int((~np.isfinite(block)).any(axis=1).sum())
                writer.put(start, flips.index(flip), block)
            last_of_shard = (step + 1 == len(order.steps)
                             or shard_of_step[step + 1] != shard_of_step[step])
            if last_of_shard:
                elapsed = time.perf_counter() - started
                manifest["build_seconds"] = seconds_before + elapsed
                _finish_shard(info, directory, manifest, writer, shards, shard_of_step[step],
                              images_done / max(elapsed, 1e-9))
    if info.is_main:
        size = expected_bytes(manifest)
        log.info("teacher cache %s complete: %d samples x %d flips x %d-d %s, %.2f GiB, "
                 "built in %.1f s (%.1f images/s)", directory, data_info.num_samples,
                 len(flips), teacher.embedding_dim, cfg.teacher.cache_dtype,
                 size / 2 ** 30, manifest["build_seconds"],
                 images_done / max(time.perf_counter() - started, 1e-9))
        if manifest["nonfinite_rows"]:
            log.warning("teacher cache %s: %d rows hold NaN/Inf; training skips the steps "
                        "that read them", directory, manifest["nonfinite_rows"])
    return dist.broadcast_object(manifest)


def _finish_shard(info: dist.DistInfo, directory: Path, manifest: dict,
                  writer: RowWriter | None, shards: list, shard: int, images_per_s: float) -> None:
    """Rank 0 makes the shard's rows durable, records their sha256 and replaces the manifest
    (``complete`` with the last shard); every rank learns whether that failed (one collective
    per shard)."""
    error = None
    if info.is_main:
        try:
            manifest["shards"][str(shard)] = writer.end_shard()
            manifest["complete"] = len(manifest["shards"]) == len(shards)
            write_manifest(directory, manifest)
        except CacheWriteError as err:
            error = err
        else:
            log.info("teacher cache: shard %d/%d written (%.0f images/s)",
                     len(manifest["shards"]), len(shards), images_per_s)
    error = dist.broadcast_object(error)
    if error is not None:
        raise error
