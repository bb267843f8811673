"""One run of a study (the teacher, or a student variant with a seed) and what became of it:
what the runner plans and fills in and the report reads."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fr_distill.checkpoint.files import CheckpointStore
from fr_distill.config import Config
from fr_distill.engine.plan import CHECKPOINT_SUBDIR

#: The name of the teacher's run.
TEACHER = "teacher"


@dataclass
class StudyRun:
    """One training run of the study, and what became of it."""

    name: str                       # "teacher" or "<variant>/seed<k>"
    variant: str
    seed: int | None
    config: Config
    config_path: Path
    overrides: list[str]
    run_dir: Path
    log: Path
    status: str = "pending"         # pending | reused | trained | failed | not run
    error: str = ""
    seconds: float = 0.0
    results: dict = field(default_factory=dict)
    outcomes: dict = field(default_factory=dict)
    model_file: Path | None = None  # a model that is not this run's checkpoint (given teacher)

    @property
    def steps(self) -> int:
        return self.config.schedule.total_steps

    @property
    def final_checkpoint(self) -> Path:
        store = CheckpointStore(self.run_dir / CHECKPOINT_SUBDIR, keep_last=1,
                                sharded=self.config.checkpoint.format == "dcp")
        return store.step_path(self.steps)

    @property
    def evaluated_file(self) -> Path:
        """The model file the study evaluates: the final checkpoint, or ``model_file``."""
        return self.model_file or self.final_checkpoint

    @property
    def ok(self) -> bool:
        return self.status in ("reused", "trained")
