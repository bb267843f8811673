"""``fr-distill cache-teacher`` on the process group: the request checked, the run's
pre-flight (:mod:`fr_distill.engine.preflight`), the teacher loaded as training loads it
(:func:`fr_distill.engine.build.load_teacher`), then the sweep of
:mod:`fr_distill.teacher_cache.build`."""
from __future__ import annotations

import fcntl

from fr_distill import dist
from fr_distill.config import Config
from fr_distill.console import setup_console
from fr_distill.engine.build import load_teacher
from fr_distill.engine.preflight import preflight
from fr_distill.teacher_cache.build import DEFAULT_SHARD_SAMPLES, build_rows, check_request
from fr_distill.teacher_cache.lock import release_cache


def build_cache(cfg: Config, shard_samples: int = DEFAULT_SHARD_SAMPLES,
                force: bool = False) -> dict:
    """Build (or finish) the cache ``teacher.cache`` of ``cfg``'s teacher and training set on
    torchrun's process group; returns its manifest."""
    info = dist.init(cfg.distributed.backend, cfg.distributed.device, cfg.distributed.timeout_s)
    setup_console(info.is_main)
    try:
        check_request(cfg, shard_samples)
        checked = preflight(cfg, cache_build=True)
        return build_rows(cfg, info, checked.data, load_teacher(cfg, info.device), shard_samples,
                          force)
    finally:
        release_cache(cfg.teacher.cache, fcntl.LOCK_EX)
        dist.shutdown()
