"""The exact teacher-embedding cache (METHOD §4, "teacher cache").

``fr-distill cache-teacher`` (:mod:`.build`) writes the teacher's embedding of every training
sample, unflipped and flipped; a run with ``teacher.cache: DIR`` reads the rows
(:class:`~.store.TeacherCache`) instead of running the teacher, after :func:`open_cache` has
checked that they are the rows this run's teacher would compute (:mod:`.identity`).
"""
from __future__ import annotations

import fcntl
import logging
from pathlib import Path

import torch

from fr_distill import dist
from fr_distill.config import Config
from fr_distill.data import DatasetInfo
from fr_distill.paths import file_sha256
from fr_distill.teacher_cache.content import content_difference
from fr_distill.teacher_cache.identity import (CacheError, execution, execution_differences,
                                               first_difference, identity)
from fr_distill.teacher_cache.lock import lock_cache, release_cache
from fr_distill.teacher_cache.store import MANIFEST, TeacherCache, read_manifest, verify

log = logging.getLogger(__name__)

__all__ = ["CacheError", "TeacherCache", "check_cache", "open_cache", "release_cache"]


def check_cache(cfg: Config, info: DatasetInfo, device: torch.device, batch_per_rank: int) -> dict:
    """The manifest of ``teacher.cache`` after refusing, with one line naming what differs, a
    cache this run cannot read exactly (see :mod:`.store`); warns when the rows were computed
    with other execution settings (they may then differ from the teacher's own output in the
    last bits)."""
    directory = Path(cfg.teacher.cache)
    manifest = read_manifest(directory)
    if manifest is None:
        raise CacheError(f"teacher.cache {directory}: no {MANIFEST}; build the cache with "
                         f"fr-distill cache-teacher --config <this config>")
    run_identity = identity(cfg, info, device, file_sha256(cfg.teacher.path),
                            plain_state_dict=True)
    problem = first_difference(manifest["identity"], run_identity, str(directory), cfg)
    if problem:
        raise CacheError(problem)
    if cfg.data.flip and True not in manifest["flips"]:
        raise CacheError(f"teacher.cache {directory} holds unflipped rows only (built with "
                         f"data.flip=false) but this run flips its images (data.flip=true): "
                         f"build the cache with data.flip=true, or set data.flip=false")
    _check_content(cfg, info, directory, manifest)
    verify(directory, manifest)
    changed = execution_differences(manifest["execution"], execution(cfg, device, batch_per_rank))
    if changed:
        log.warning("teacher cache %s was computed with other settings (%s): its rows may differ "
                    "from this run's teacher in the last bits", directory, ", ".join(changed))
    return manifest


def _check_content(cfg: Config, info: DatasetInfo, directory: Path, manifest: dict) -> None:
    """With ``teacher.cache_verify_content``: refuse a cache without image digests, or one
    built from images whose bytes differ from this run's (naming the first)."""
    if not cfg.teacher.cache_verify_content:
        return
    if not manifest.get("image_digests"):
        raise CacheError(f"teacher.cache {directory} holds no image digests (built with "
                         f"teacher.cache_verify_content=false) but this run has "
                         f"teacher.cache_verify_content=true: build the cache with it, or set "
                         f"it false")
    problem = content_difference(directory, manifest["image_digests"], info)
    if problem:
        raise CacheError(f"{problem}; build the cache again from these images")


def open_cache(cfg: Config, info: DatasetInfo, device: torch.device,
               batch_per_rank: int) -> TeacherCache:
    """Lock ``teacher.cache`` shared on rank 0 until :func:`release_cache` (at the run's end:
    no build may change it meanwhile, :mod:`.lock`) and check it there (:func:`check_cache`,
    the same error on every rank); open it on every rank (``teacher.cache_placement``)."""
    manifest = None
    if dist.is_main():
        try:
            lock_cache(Path(cfg.teacher.cache), fcntl.LOCK_SH)
            manifest = check_cache(cfg, info, device, batch_per_rank)
        except CacheError as err:
            manifest = err
    manifest = dist.broadcast_object(manifest)
    if isinstance(manifest, CacheError):
        raise manifest
    return TeacherCache(Path(cfg.teacher.cache), manifest, device, cfg.teacher.cache_placement)
