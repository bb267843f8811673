"""Run records, console lines, scalars for TensorBoard and Weights & Biases, the progress bar.

At the start rank 0 writes the resolved config (``config.yaml``) and ``run_info.json``
(versions, devices, world size, batch sizes). Every ``logging.every_steps`` the loss terms,
total, mean student–teacher cosine and timings of the window are averaged over ranks (one
all-reduce on every rank: the average of the per-rank values is the global-batch value, see
the objective's contract) and rank 0 prints one line — step, each term, lr, global images/s,
data-wait share, ETA, grad scale, cosine — and writes the same to ``metrics.jsonl`` and to
each scalar sink: TensorBoard (``logging.tensorboard``) and a Weights & Biases run
(``logging.wandb``), which get the same tagged scalars (``train/…``, ``diagnostics/…``,
``eval/…``). A tqdm bar shows progress when stderr is a terminal (``progress_bar: auto``).
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import math
import os
import platform
import secrets
import socket
import sys
import time

import torch

from fr_distill import dist
from fr_distill.config import Config, save_config, to_dict
from fr_distill.engine.callbacks import Callback, one_line
from fr_distill.engine.run_dir import WANDB_RUN_ID
from fr_distill.engine.state import Run
from fr_distill.engine.step import StepStats
from fr_distill.errors import FrDistillError

log = logging.getLogger("fr_distill")

_PACKAGES = ("fr_distill", "torch", "torchvision", "numpy", "nvidia-dali-cuda130", "timm",
             "onnxruntime")


def run_info(run: Run) -> dict:
    """What ran where: versions, devices, world size, batch sizes."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    device = run.info.device
    return {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(), "python": platform.python_version(), "versions": versions,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "cuda": torch.version.cuda, "nccl": ".".join(map(str, torch.cuda.nccl.version()))
        if torch.cuda.is_available() else None,
        "world_size": run.info.world_size, "batch_per_rank": run.loader.batch_size,
        "global_batch": run.global_batch, "accumulation_steps": run.accumulation,
        "amp_dtype": str(run.amp_dtype) if run.amp_dtype else "float32",
        "start_step": run.start_step, "total_steps": run.total_steps,
    }


class LoggingSetupError(FrDistillError):
    """What a logging key asks for cannot be had: its package does not import, or the wandb
    run does not start (bad input: exit 2)."""


def import_wandb():
    """The ``wandb`` module, or a one-line :class:`LoggingSetupError` naming ``logging.wandb``
    (it is an optional dependency: the ``wandb`` extra)."""
    try:
        import wandb
    except ImportError as err:
        missing = isinstance(err, ModuleNotFoundError) and err.name == "wandb"
        reason = "is not installed" if missing else f"cannot be imported ({one_line(err)})"
        raise LoggingSetupError(f"logging.wandb is true but the wandb package {reason} (pip "
                                f"install fr_distill[wandb], or set logging.wandb=false)") from None
    return wandb


def check_logging(cfg: Config) -> None:
    """Pre-flight (before any model is built, and in the dry run): the packages the logging
    keys ask for import."""
    if cfg.logging.wandb:
        import_wandb()


class ScalarSink:
    """Where tagged scalars go besides ``metrics.jsonl``: ``write`` at every logging window and
    evaluation, ``flush`` after an evaluation, ``close`` at the end of training."""

    def write(self, scalars: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardSink(ScalarSink):
    """Event files in ``<run_dir>/tensorboard``; a resumed run purges the events an earlier
    attempt wrote after the checkpoint it resumes from."""

    def __init__(self, run: Run) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(run.run_dir / "tensorboard"), purge_step=run.start_step)

    def write(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink(ScalarSink):
    """A Weights & Biases run in project ``logging.wandb_project`` with the resolved config,
    its local files in ``<run_dir>/wandb``.

    The mode is ``logging.wandb_mode``, but a ``WANDB_MODE`` environment variable wins (e.g.
    ``offline`` on nodes without a network, ``disabled`` in CI): no ``mode`` is passed then,
    since wandb lets an explicit one override its variable. The run id is kept in
    ``<run_dir>/wandb_run_id``: a run resumed from a checkpoint continues that wandb run
    (``resume="allow"``), a run starting at step 0 begins a new one. wandb's step is the
    optimizer step, so a step logged twice (after a crash between a checkpoint and the next
    one) keeps its first values, as wandb keeps a run's steps increasing. A wandb run left
    active in this process (by a training that raised) is finished first.
    """

    def __init__(self, run: Run) -> None:
        wandb = import_wandb()
        id_file = run.run_dir / WANDB_RUN_ID
        run_id = (id_file.read_text().strip() if run.start_step > 0 and id_file.is_file()
                  else secrets.token_hex(4))
        id_file.write_text(run_id + "\n")
        logging_cfg = run.cfg.logging
        mode = None if os.environ.get("WANDB_MODE") else logging_cfg.wandb_mode
        try:
            self.run = wandb.init(project=logging_cfg.wandb_project, mode=mode, id=run_id,
                                  resume="allow", dir=str(run.run_dir), reinit="finish_previous")
        except wandb.errors.Error as err:  # e.g. online without an API key (wandb login)
            raise LoggingSetupError(f"logging.wandb: cannot start the wandb run {run_id} "
                                    f"({one_line(err)}); run wandb login, or set "
                                    f"logging.wandb_mode=offline") from None
        # after init: a resumed run takes this start's config (changed keys included)
        self.run.config.update(to_dict(run.cfg), allow_val_change=True)

    def write(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def scalar_sinks(run: Run) -> list[ScalarSink]:
    """The sinks the logging keys ask for (rank 0)."""
    sinks: list[ScalarSink] = []
    if run.cfg.logging.tensorboard:
        sinks.append(TensorBoardSink(run))
    if run.cfg.logging.wandb:
        sinks.append(WandbSink(run))
    return sinks


def _eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds))) if math.isfinite(seconds) else "?"


class LoggingCallback(Callback):
    """Console, ``metrics.jsonl``, the scalar sinks and tqdm; files and output on rank 0 only."""

    def __init__(self) -> None:
        self.sinks: list[ScalarSink] = []
        self.bar = None
        self.said_balance_held = False
        self._reset_window()

    def _reset_window(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counted = 0
        self.steps = 0
        self.images = 0
        self.skipped = 0
        self.data_wait = 0.0
        self.busy = 0.0
        self.started = time.perf_counter()

    def on_train_start(self, run: Run) -> None:
        self._reset_window()
        if not dist.is_main():
            return
        run.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(run.cfg, run.run_dir / "config.yaml")
        (run.run_dir / "run_info.json").write_text(json.dumps(run_info(run), indent=2) + "\n")
        log.info("training %s on %d rank(s) [%s], batch %d/rank, global %d x %d accumulation, "
                 "steps %d -> %d, output %s", run.cfg.model.name, run.info.world_size,
                 run.info.device, run.loader.batch_size, run.global_batch, run.accumulation,
                 run.start_step, run.total_steps, run.run_dir)
        self.sinks = scalar_sinks(run)
        mode = run.cfg.logging.progress_bar
        if mode == "always" or (mode == "auto" and sys.stderr.isatty()):
            from tqdm import tqdm
            self.bar = tqdm(total=run.total_steps, initial=run.start_step, unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, run: Run, stats: StepStats) -> None:
        self.steps += 1
        self.images += stats.images
        self.data_wait += stats.data_wait_s
        self.busy += stats.step_time_s
        if stats.skipped:
            self.skipped += 1
        else:
            self.counted += 1
            values = dict(stats.terms, total=stats.total)
            if stats.cosine is not None:
                values["cosine"] = stats.cosine
            for key, value in values.items():
                self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
        if self.bar is not None:
            self.bar.update(1)
        if run.logs_step(run.step) or run.stop_requested:
            self._emit(run, stats)
            self._reset_window()

    def _emit(self, run: Run, stats: StepStats) -> None:
        keys = sorted(self.sums)
        local = [self.sums[k] / self.counted for k in keys] + [
            torch.tensor(self.data_wait / max(self.busy, 1e-9))]
        mean = dist.all_reduce_sum(torch.stack([v.to(run.info.device) for v in local]))
        mean = (mean / run.info.world_size).tolist()
        if not dist.is_main():
            return
        wall = time.perf_counter() - self.started
        grad_scale = run.scaler.get_scale() if run.scaler.is_enabled() else 1.0
        record = {"step": run.step, **dict(zip(keys, mean[:-1])), "lr": stats.lr,
                  "images_per_s": self.images / max(wall, 1e-9), "data_wait_share": mean[-1],
                  "grad_scale": grad_scale, "skipped_steps": self.skipped,
                  "nonfinite_total": run.guard.total}
        if stats.grad_norm is not None:
            record["grad_norm"] = float(stats.grad_norm)
        if stats.diagnostics:
            names = list(stats.diagnostics)
            record.update(zip(names, torch.stack(list(stats.diagnostics.values())).tolist()))
        eta = (run.total_steps - run.step) * wall / max(self.steps, 1)
        terms = " ".join(f"{k} {record[k]:.4f}" for k in keys if k not in ("total", "cosine"))
        line = (f"step {run.step}/{run.total_steps} | {terms} | total {record.get('total', math.nan):.4f}"
                f" | lr {stats.lr:.5g} | {record['images_per_s']:.1f} img/s"
                f" | data {100 * record['data_wait_share']:.0f}% | eta {_eta(eta)}"
                f" | scale {grad_scale:g}")
        if "cosine" in record:
            line += f" | cos {record['cosine']:.4f}"
        if self.skipped:
            line += f" | skipped {self.skipped} non-finite"
        shares = [f"{k.split('/', 1)[1]} {record[k]:.2f}" for k in record if k.startswith("grad_share/")]
        if len(shares) > 1:
            line += " | grad share " + " ".join(shares)
        weights = [f"{k.split('/', 1)[1]} {record[k]:.3g}" for k in record
                   if k.startswith("balance/") and k != "balance/held"]
        if weights:
            line += " | balanced weight " + " ".join(weights)
        self._print(line)
        if record.get("balance/held", 0.0) > 0 and not self.said_balance_held:
            self.said_balance_held = True
            log.warning("step %d: the face-recognition gradient on the student embeddings is zero "
                        "or non-finite: the balanced weights keep their previous values "
                        "(METHOD E7); said once", run.step)
        with open(run.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {f"{'diagnostics' if '/' in key else 'train'}/{key}": value
                   for key, value in record.items() if key != "step"}
        for sink in self.sinks:
            sink.write(scalars, run.step)

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            log.info(line)

    def eval_results(self, run: Run, results: dict[str, float]) -> None:
        """Console line, ``metrics.jsonl`` record and sink scalars of an evaluation (rank 0)."""
        if not dist.is_main():
            return
        self._print(f"eval step {run.step}: " + " ".join(
            f"{k} {v:.4f}" for k, v in sorted(results.items())))
        with open(run.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": run.step, "eval": results}) + "\n")
        for sink in self.sinks:
            sink.write({f"eval/{key}": value for key, value in results.items()}, run.step)
            sink.flush()

    def on_train_end(self, run: Run) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink in self.sinks:
            sink.close()
