"""The run directory (``run.output_dir``): one run at a time, writable, and its own checkpoints.

Before the first model is built, :func:`claim_run_dir` (a collective; rank 0 acts and
broadcasts the outcome, so every rank raises the same one-line error):

* **One run at a time.** Rank 0 holds an exclusive ``flock`` on ``<output_dir>/.lock`` for the
  life of the process (:mod:`fr_distill.locks`); a second run started on the same directory
  fails at once with :class:`RunDirError` naming the holder (pid, host, start time). The
  lock dies with the process and never lives on in a child of it (DALI's forked workers),
  so a crashed, killed or preempted run never leaves a stale lock (on file systems without
  ``flock`` support, e.g. some NFS mounts, the call fails and the error says so).
* **Writable.** The directory and ``checkpoints/`` are created and a file is written and
  removed in each, so a permission problem is a one-line error before training, not a
  traceback at the first checkpoint.
* **Checkpoints belong to a run.** A fresh start (``checkpoint.resume=false``, or no valid
  checkpoint to resume from) in a directory holding an earlier run's checkpoints moves them,
  with that run's ``metrics.jsonl``, ``tensorboard/`` and Weights & Biases records
  (``wandb_run_id``, ``wandb/``), into ``earlier_runs/<YYYYmmdd-HHMMSS>/`` and says so: the
  new run's pruning can then only ever delete the new run's own files, and a later resume can
  only pick the new run.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
from pathlib import Path

from fr_distill import dist, locks
from fr_distill.checkpoint.files import CheckpointStore
from fr_distill.errors import FrDistillError
from fr_distill.paths import require_writable_dir

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
EARLIER_RUNS = "earlier_runs"
#: The file holding the run's Weights & Biases run id (``logging.wandb``).
WANDB_RUN_ID = "wandb_run_id"
#: What belongs to one run besides its checkpoints (moved aside with them).
RUN_RECORDS = ("metrics.jsonl", "tensorboard", WANDB_RUN_ID, "wandb")

_held_locks: dict[Path, int] = {}  # directory -> its lock (fr_distill.locks descriptor)


class RunDirError(FrDistillError, RuntimeError):
    """The run directory cannot be used: in use by another run (not writable:
    :class:`~fr_distill.paths.NotWritableError`)."""

    exit_code = 2


def lock_directory(directory: Path, key: str = "run.output_dir", user: str = "run") -> None:
    """Take ``directory``'s exclusive lock (:func:`fr_distill.locks.acquire`: never held by a
    child of this process), kept until this process ends or calls :func:`release`; the error
    names the config ``key`` and the holder (a ``user`` of the directory)."""
    if locks.is_held(_held_locks.get(directory)):
        return
    path = directory / LOCK_FILE
    try:
        _held_locks[directory] = locks.acquire(path)
    except locks.LockBusy as busy:
        raise RunDirError(f"{key} {directory} is in use by another {user} ({busy}); "
                          f"wait for it, stop it, or choose another {key}") from None
    except OSError as err:
        unsupported = "; the file system does not support flock" \
            if isinstance(err, locks.FlockUnsupported) else ""
        raise RunDirError(f"{key} {directory}: cannot lock {path} ({err.strerror})"
                          f"{unsupported}") from None


def release(run_dir: str | os.PathLike) -> None:
    """Release the lock this process holds on ``run_dir`` (at the end of a run)."""
    locks.release(_held_locks.pop(Path(run_dir), None))


def set_aside_earlier_run(run_dir: Path, store: CheckpointStore, reason: str) -> Path | None:
    """Move an earlier run's checkpoints and records into ``earlier_runs/<time>/``; returns
    where they went, None when there was nothing to move."""
    if not store.directory.is_dir() or not any(store.directory.iterdir()):
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = run_dir / EARLIER_RUNS / stamp
    suffix = 1
    while target.exists():
        suffix += 1
        target = run_dir / EARLIER_RUNS / f"{stamp}-{suffix}"
    target.mkdir(parents=True)
    os.replace(store.directory, target / store.directory.name)
    for name in RUN_RECORDS:
        if (run_dir / name).exists():
            os.replace(run_dir / name, target / name)
    (target / "SET_ASIDE.json").write_text(json.dumps({"reason": reason}) + "\n")
    return target


def probe_run_dir(run_dir: str | os.PathLike, store: CheckpointStore, fresh_start: bool) -> str:
    """The checks of :func:`claim_run_dir` for a dry run, changing nothing: the directory (or
    its nearest existing parent) is writable and not locked by a run. Returns what a real
    start would do with an earlier run's checkpoints (one line, empty if nothing)."""
    run_dir = Path(run_dir)
    for directory, key in ((run_dir, "run.output_dir"),
                           (store.directory, "run.output_dir (its checkpoints/)")):
        if directory.exists() and not directory.is_dir():
            raise RunDirError(f"config key '{key}': {directory} is a file, not a directory")
    for directory in (store.directory, run_dir, *run_dir.parents):
        if directory.exists():
            if not os.access(directory, os.W_OK | os.X_OK):
                raise RunDirError(f"config key 'run.output_dir': cannot write to {directory}")
            break
    lock = run_dir / LOCK_FILE
    if lock.is_file() and not locks.is_held(_held_locks.get(run_dir)):
        with open(lock, "r+b") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = f.read().decode(errors="replace").strip() or "unknown process"
                raise RunDirError(f"run.output_dir {run_dir} is in use by another run "
                                  f"({holder})") from None
    earlier = list(store.directory.iterdir()) if store.directory.is_dir() else []
    if fresh_start and earlier:
        return (f"a fresh start moves the {len(earlier)} files of {store.directory} (an earlier "
                f"run) to {run_dir / EARLIER_RUNS}/<time>/")
    return ""


def claim_run_dir(run_dir: str | os.PathLike, store: CheckpointStore, fresh_start: bool,
                  resume: bool) -> None:
    """Lock and check ``run_dir`` and, on a fresh start, set an earlier run's checkpoints
    aside (see the module docstring). A collective: rank 0 acts, every rank raises its error."""
    dist.run_on_main(_claim, Path(run_dir), store, fresh_start, resume)


def _claim(run_dir: Path, store: CheckpointStore, fresh_start: bool, resume: bool) -> None:
    require_writable_dir(run_dir, "config key 'run.output_dir'")
    lock_directory(run_dir)
    require_writable_dir(store.directory, "config key 'run.output_dir (its checkpoints/)'")
    if not fresh_start:
        return
    reason = "checkpoint.resume=false" if not resume else "no valid checkpoint to resume from"
    try:
        moved = set_aside_earlier_run(run_dir, store, reason)
    except OSError as err:
        raise RunDirError(f"run.output_dir {run_dir}: cannot move the earlier run's checkpoints "
                          f"aside ({err})") from None
    if moved is not None:
        log.warning("%s: the checkpoints and records found in %s were moved to %s; a new run "
                    "starts", reason, run_dir, moved)
        require_writable_dir(store.directory, "config key 'run.output_dir (its checkpoints/)'")
