"""The one pre-flight: every input of a run checked, in one order, before any model is built.

``train``, ``train --dry-run`` and ``cache-teacher`` all start with :func:`preflight`, so a
bad input gets the same one-line error (naming the file, key or record) whichever command
meets it first, and nothing expensive has started when it does: the checkpoint to resume
from (chosen by rank 0), the paths the config names, the logging packages, the training data
with its decode check, the evaluation sets and the teacher's check sets. Checks that read
files run on rank 0 and fail on every rank alike (:func:`fr_distill.dist.run_on_main`).

:func:`dry_run` is the pre-flight plus what a run would refuse before its first step (the run
directory, the batch plan, the teacher cache), without building a model or changing a file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fr_distill import dist
from fr_distill.checkpoint import files as checkpoint
from fr_distill.config import Config, check_paths
from fr_distill.data import DatasetInfo, preflight as check_data
from fr_distill.data.decode_check import apply_decode_check
from fr_distill.data.loader import select_backend
from fr_distill.engine.faults import TrainingError
from fr_distill.engine.plan import checkpoint_store, find_resume, make_plan
from fr_distill.engine.run_dir import probe_run_dir
from fr_distill.engine.run_log import check_logging
from fr_distill.eval.runner import check_bin_sets
from fr_distill.teacher_cache import check_cache


@dataclass
class Preflight:
    """What the pre-flight established."""

    resume_path: Path | None  # the newest valid checkpoint; None: a fresh start or a cache build
    data: DatasetInfo         # the training data, scanned and decode-checked


def preflight(cfg: Config, cache_build: bool = False) -> Preflight:
    """Check every input of ``cfg`` (see the module docstring) on the process group.

    ``cache_build``: for ``cache-teacher``, which resumes, logs and evaluates nothing and
    writes ``teacher.cache`` (so the cache need not exist yet).
    """
    resume_path = None if cache_build else find_resume(cfg)  # first: a resumed run reads no model.init
    if cache_build:
        check_paths(cfg, cache_exists=False)
    else:
        check_paths(cfg, resuming=resume_path is not None)
        dist.run_on_main(check_logging, cfg)
    data = apply_decode_check(check_data(cfg.data), cfg.data, select_backend(cfg.data.loader))
    if not cache_build:
        dist.run_on_main(check_bin_sets, list(cfg.eval.bin_sets), cfg.eval.best_metric)
    dist.run_on_main(check_bin_sets, list(cfg.teacher.check_sets))
    return Preflight(resume_path, data)


def dry_run(cfg: Config) -> str:
    """Validate paths, the logging packages, data, evaluation sets, the teacher cache and the
    run directory and describe the run, without building models, training or changing any
    file."""
    checked = preflight(cfg)
    resume_path, info = checked.resume_path, checked.data
    note = probe_run_dir(cfg.run.output_dir, checkpoint_store(cfg), resume_path is None)
    resumed = checkpoint.load_for_resume(resume_path) if resume_path else None
    plan = make_plan(cfg, info, dist.env_world()[1], resume_path, resumed)
    if info.num_samples < plan.global_batch:
        raise TrainingError(f"data.train has {info.num_samples} images, fewer than one global "
                            f"batch of {plan.global_batch}")
    if cfg.teacher.cache:  # refused here as the run would refuse it (checksums included)
        use_cuda = cfg.distributed.device == "cuda" or (cfg.distributed.device == "auto"
                                                        and torch.cuda.is_available())
        check_cache(cfg, info, torch.device("cuda" if use_cuda else "cpu"), plan.batch_per_rank)
    return plan.describe(cfg) + (f"\nnote      {note}" if note else "")
