"""The plan of a training run, worked out before any model is built.

Batch sizes (per rank, global, effective with accumulation), the scaled learning rate,
steps per epoch and the checkpoint to resume from. A resumed run keeps the checkpoint's
global batch whatever the world size (per-rank batch = global / W, which must divide), so
its data order, memory-bank size and learning rate continue unchanged. ``launch/train.py
--dry-run`` prints :meth:`Plan.describe` after the pre-flight (:mod:`fr_distill.engine.preflight`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fr_distill import dist
from fr_distill.checkpoint.files import CheckpointStore
from fr_distill.config import KD_TERMS, Config, get_key
from fr_distill.data import DatasetInfo
from fr_distill.engine.faults import TrainingError
from fr_distill.engine.optim import scaled_lr
from fr_distill.eval.teacher_check import check_sets

CHECKPOINT_SUBDIR = "checkpoints"


@dataclass
class Plan:
    """Sizes and positions of a run (see the module docstring)."""

    world_size: int
    batch_per_rank: int
    global_batch: int
    accumulation: int
    lr: float
    num_samples: int
    num_classes: int
    data_format: str
    resume_path: Path | None
    resume_step: int
    data_sets: list[tuple[str, str, int, int, int]] = field(default_factory=list)
    """Of several training sets: (root, format, images, identities, first label) of each."""

    @property
    def effective_batch(self) -> int:
        return self.global_batch * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per pass over the data."""
        return self.num_samples // self.global_batch // self.accumulation

    def describe(self, cfg: Config) -> str:
        """A human-readable summary of what training ``cfg`` would do."""
        terms = [f"sphereface2 x{cfg.loss.sphereface2.weight:g} ({cfg.loss.sphereface2.parallel})"
                 ] if cfg.loss.sphereface2.weight > 0 else []
        terms += [f"{t} x{get_key(cfg, f'loss.{t}.weight'):g}" for t in KD_TERMS
                  if get_key(cfg, f"loss.{t}.weight") > 0]
        epochs = cfg.schedule.total_steps / max(self.steps_per_epoch, 1)
        resume = (f"{self.resume_path} (step {self.resume_step})" if self.resume_path
                  else "none (fresh start)")
        data = f"{len(self.data_sets)} sets" if self.data_sets else cfg.data.train
        return "\n".join([
            f"data      {data} ({self.data_format}): {self.num_samples} images, "
            f"{self.num_classes} identities",
            *[f"  set {k}   {root} ({kind}): {images} images, {classes} identities, labels "
              f"{first}-{first + classes - 1}"
              for k, (root, kind, images, classes, first) in enumerate(self.data_sets)],
            _student_line(cfg, self.resume_path),
            _teacher_line(cfg),
            f"objective {' + '.join(terms) or 'none'}",
            f"batch     {self.batch_per_rank}/rank x {self.world_size} rank(s) = "
            f"{self.global_batch} global, x{self.accumulation} accumulation = "
            f"{self.effective_batch} per optimizer step",
            f"schedule  {cfg.schedule.name}, lr {self.lr:g}, {cfg.schedule.total_steps} steps "
            f"({epochs:.2f} epochs of {self.steps_per_epoch} steps), warmup "
            f"{cfg.schedule.warmup_steps}",
            f"precision {cfg.precision.amp}",
            f"checkpoint every {cfg.checkpoint.every_steps} steps, keep {cfg.checkpoint.keep_last}, "
            f"format {cfg.checkpoint.format}, in {Path(cfg.run.output_dir) / CHECKPOINT_SUBDIR}",
            f"resume    {resume}",
            f"eval      {', '.join(cfg.eval.bin_sets) or 'none'}",
        ])


def _student_line(cfg: Config, resume_path: Path | None) -> str:
    """The student's architecture and where its weights start."""
    line = f"student   {cfg.model.name} width {cfg.model.width:g}, {cfg.model.embedding_dim}-d"
    if not cfg.model.init:
        return line
    if resume_path:
        return line + f"; model.init {cfg.model.init} ignored (the checkpoint's student resumes)"
    skip = (f", leaving {', '.join(cfg.model.init_skip)} at their fresh initialization"
            if cfg.model.init_skip else "")
    return line + f", initialized from {cfg.model.init}{skip}"


def _teacher_line(cfg: Config) -> str:
    if not cfg.teacher.path:
        return "teacher   none (plain training)"
    line = f"teacher   {cfg.teacher.name} from {cfg.teacher.path}"
    if cfg.teacher.cache:
        return (line + f"; its rows read from the cache {cfg.teacher.cache} "
                       f"({cfg.teacher.cache_dtype}, placement {cfg.teacher.cache_placement})")
    sets = check_sets(cfg)
    if sets:
        line += f"; checked on {', '.join(sets)} before a fresh start"
        if cfg.teacher.min_accuracy > 0:
            line += f" (min accuracy {cfg.teacher.min_accuracy:g})"
    return line


def checkpoint_store(cfg: Config) -> CheckpointStore:
    return CheckpointStore(Path(cfg.run.output_dir) / CHECKPOINT_SUBDIR, cfg.checkpoint.keep_last,
                           sharded=cfg.checkpoint.format == "dcp",
                           background=cfg.checkpoint.async_save)


def find_resume(cfg: Config) -> Path | None:
    """The newest valid checkpoint of the run directory, chosen by rank 0 for all ranks."""
    found = checkpoint_store(cfg).latest_valid() if cfg.checkpoint.resume and dist.is_main() else None
    return dist.broadcast_object(found)


def make_plan(cfg: Config, info: DatasetInfo, world_size: int, resume_path: Path | None,
              resumed: dict | None) -> Plan:
    """Batch sizes and learning rate for ``world_size`` ranks, keeping a resumed run's global batch."""
    global_batch = cfg.data.batch_size * world_size
    if resumed is not None:
        global_batch = int(resumed["data"]["global_batch"])
        if global_batch % world_size:
            raise TrainingError(f"{resume_path}: its global batch {global_batch} does not divide "
                                f"over {world_size} ranks; resume on a world size dividing it")
    accumulation = cfg.optim.accumulation_steps
    return Plan(world_size=world_size, batch_per_rank=global_batch // world_size,
                global_batch=global_batch, accumulation=accumulation,
                lr=scaled_lr(cfg.optim, global_batch * accumulation),
                num_samples=info.num_samples, num_classes=info.num_classes,
                data_format=info.format, resume_path=resume_path,
                resume_step=int(resumed["step"]) if resumed is not None else 0,
                data_sets=[(p.root, p.format, p.num_samples, p.num_classes, first)
                           for p, first in zip(info.parts, info.label_offsets())])
