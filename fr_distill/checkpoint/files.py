"""Atomic, checksummed training checkpoints with keep-last-K and auto-resume.

Layout of a run directory's ``checkpoints/``::

    step_00002000.pt          torch.save of the checkpoint dict (format "fr_distill", version 1)
    step_00002000.pt.sha256   "<sha256 hex>  step_00002000.pt" (``sha256sum -c`` format)
    step_00002000/            with ``checkpoint.format=dcp``: a sharded checkpoint directory
                              (:mod:`fr_distill.checkpoint.sharded`), same dict
    best.pt, best.pt.sha256   the best checkpoint by ``eval.best_metric``

A file is written to a temporary name in the same directory, flushed and fsynced, renamed
over its final name with ``os.replace`` and the directory fsynced; the checksum sidecar is
written the same way afterwards. A checkpoint counts only when its sidecar exists and matches
(a directory: when its ``SHA256SUMS`` exists and every file matches), so a crash at any point
leaves either the new checkpoint complete or the previous ones untouched, and a truncated,
corrupt or incomplete checkpoint is skipped (with a warning naming the file) in favour of the
previous one. Either format resumes on any world size; :func:`load` reads either into the
same dict, loadable from a file with ``torch.load(weights_only=True)``.

Nothing read runs code: files are read with ``torch.load(weights_only=True)``, a checkpoint
directory's index with a restricted unpickler (:mod:`fr_distill.checkpoint.sharded`).
A checksum cannot tell a planted file from a good one (whoever writes the file can write its
checksum), so a pickle referring to code is refused whatever its checksum, in one line naming
the file; a directory whose index is refused counts as unusable, and a resumed run falls back
to the previous checkpoint.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from fr_distill import dist
from fr_distill.checkpoint import sharded
from fr_distill.errors import FrDistillError, first_line
from fr_distill.paths import atomic_write, file_sha256
from fr_distill.unpickling import refusal

log = logging.getLogger(__name__)

FORMAT = "fr_distill"
VERSION = 1
CHECKSUM_SUFFIX = ".sha256"
_STEP_NAME = re.compile(r"^step_(\d+)(\.pt)?$")

CHECKPOINT_MODE = 0o600  # a checkpoint holds the model: its owner's alone, less the umask


class CheckpointError(FrDistillError, RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not an fr_distill checkpoint."""

    exit_code = 1


class CheckpointMismatchError(CheckpointError):
    """A valid checkpoint that does not fit this run (another student, head or optimizer
    layout): the config must change, so exit status 2."""

    exit_code = 2


def rank_error(err: BaseException) -> BaseException:
    """A rank's own exception inside DCP's ``CheckpointException`` (else ``err``)."""
    if isinstance(err, sharded.dcp.CheckpointException):
        return next(iter(err.failures.values()))[0]
    return err


def unloadable(path: str | os.PathLike, err: BaseException) -> CheckpointError:
    """The one-line error for checkpoint ``path`` whose reading raised ``err``: the global
    its pickle refers to when that was refused (naming the file of a directory), else the
    error's first line; never torch's advice to retry with ``weights_only=False``."""
    err = rank_error(err)
    reason = refusal(err) or f"cannot be loaded ({first_line(err)})"
    return CheckpointError(f"{path}: {reason}")


def save(payload: dict, path: str | os.PathLike) -> None:
    """Serialize ``payload`` and write it and its checksum sidecar atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    atomic_write(path, data, CHECKPOINT_MODE)
    atomic_write(path.with_name(path.name + CHECKSUM_SUFFIX), f"{digest}  {path.name}\n".encode(),
                 CHECKPOINT_MODE)


def verify(path: str | os.PathLike) -> str | None:
    """``None`` when ``path`` (a file or a sharded checkpoint directory) matches its
    checksums, else the reason it does not."""
    path = Path(path)
    if path.is_dir():
        return sharded.verify(path)
    sidecar = path.with_name(path.name + CHECKSUM_SUFFIX)
    if not path.is_file():
        return "file missing"
    if not sidecar.is_file():
        return f"checksum file {sidecar.name} missing (write interrupted?)"
    expected = sidecar.read_bytes().split()[:1]
    actual = file_sha256(path)
    if expected != [actual.encode()]:
        return f"sha256 mismatch (truncated or corrupt; {path.stat().st_size} bytes)"
    return None


def _checked(ckpt: object, path: str | os.PathLike) -> dict:
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an {FORMAT} checkpoint (no format='{FORMAT}' key)")
    return ckpt


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Verify and load a checkpoint file or directory whole (a directory's class-sharded rows
    assembled); :class:`CheckpointError` if unusable."""
    reason = verify(path)
    if reason is not None:
        raise CheckpointError(f"{path}: {reason}")
    try:
        if Path(path).is_dir():
            ckpt = sharded.load_whole(path)
        else:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a corrupt zip or unpickling error: one line, not a traceback
        raise unloadable(path, err) from None
    return _checked(ckpt, path)


def load_for_resume(path: str | os.PathLike) -> dict:
    """What every rank reads before building the run: a file checkpoint whole, or a sharded
    checkpoint's ``state.pt`` only (each rank reads its part of the tensors into the built
    run: :meth:`fr_distill.engine.state.Run.complete_checkpoint`). ``path`` was verified by
    :meth:`CheckpointStore.latest_valid`."""
    if not Path(path).is_dir():
        return load(path)
    try:
        state = sharded.read_state(path)
    except Exception as err:  # changed since it was verified, or refers to code: one line
        raise unloadable(path, err) from None
    return _checked(state, path)


# ----------------------------------------------------------------------------------------
# The run directory's checkpoints
# ----------------------------------------------------------------------------------------
class CheckpointStore:
    """The step checkpoints (keep the newest ``keep_last``) and ``best.pt`` of one run;
    ``sharded``: step checkpoints are written as sharded directories (``checkpoint.format``)."""

    def __init__(self, directory: str | os.PathLike, keep_last: int, sharded: bool = False,
                 background: bool = False) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.sharded = sharded
        self.background = background  # sharded checkpoints written in a background thread
        self.pending: tuple[sharded.PendingSave, int] | None = None

    def step_path(self, step: int) -> Path:
        """Where the checkpoint of ``step`` is: the one present (a directory first), else
        where this store writes it."""
        directory, file = self.directory / f"step_{step:08d}", self.directory / f"step_{step:08d}.pt"
        present = [p for p in (directory, file) if p.exists()]
        return present[0] if present else directory if self.sharded else file

    @property
    def best_path(self) -> Path:
        return self.directory / "best.pt"

    def steps(self) -> list[int]:
        """Steps of the step checkpoints present (valid or not, either format), newest first."""
        if not self.directory.is_dir():
            return []
        found = (_STEP_NAME.match(p.name) for p in self.directory.iterdir())
        return sorted({int(m.group(1)) for m in found if m}, reverse=True)

    def save_step(self, payload: dict, step: int) -> Path:
        """Write the checkpoint of ``step`` (sharded: a collective, every rank passes its own
        view; else rank 0 only), then delete the step checkpoints older than the
        ``keep_last`` newest up to ``step`` (never a later step: those are not this run's
        past, see :mod:`fr_distill.engine.run_dir`)."""
        self.finish_pending()
        path = self.directory / (f"step_{step:08d}" if self.sharded else f"step_{step:08d}.pt")
        if self.background:
            self.pending = (self._guarded(path, sharded.save, payload, path, True),
                            step)
            return path
        self._guarded(path, sharded.save if self.sharded else save, payload, path)
        self._prune(step)
        return path

    def finish_pending(self) -> Path | None:
        """Wait for the checkpoint written in the background, commit it and prune (a
        collective); ``None`` when none is pending."""
        if self.pending is None:
            return None
        (pending, step), self.pending = self.pending, None
        path = self._guarded(pending.directory, pending.finish)
        self._prune(step)
        return path

    def _prune(self, step: int) -> None:
        if dist.is_main():
            for old in [s for s in self.steps() if s <= step][self.keep_last:]:
                self._delete(old)

    def _delete(self, step: int) -> None:
        sharded.remove_directory(self.directory / f"step_{step:08d}")
        file = self.directory / f"step_{step:08d}.pt"
        for p in (file, file.with_name(file.name + CHECKSUM_SUFFIX)):
            p.unlink(missing_ok=True)

    def save_best(self, payload: dict) -> Path:
        self._guarded(self.best_path, save, payload, self.best_path)
        return self.best_path

    @staticmethod
    def _guarded(path: Path, write, *args):
        """``write(*args)``, writing ``path``, with a write failure (full disk, quota,
        permissions) as one line."""
        try:
            return write(*args)
        except (OSError, sharded.dcp.CheckpointException) as err:
            err = rank_error(err)
            reason = (err.strerror if isinstance(err, OSError) and err.strerror
                      else str(err).strip().splitlines()[0])
            raise CheckpointError(f"{path}: cannot be written ({reason}); the checkpoints "
                                  f"already saved are untouched") from None

    def latest_valid(self) -> Path | None:
        """The newest step checkpoint whose checksums match; warns about each newer bad one."""
        for step in self.steps():
            path = self.step_path(step)
            reason = verify(path)
            if reason is None:
                return path
            log.warning("checkpoint %s is unusable (%s); trying the previous one", path, reason)
        return None


# ----------------------------------------------------------------------------------------
# Random number generator states
# ----------------------------------------------------------------------------------------
def rng_state(device: torch.device) -> dict:
    """This process's RNG states (torch CPU, CUDA of ``device``, numpy, python) as plain data."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
