"""Running a study: data, the teacher, every (variant, seed) under torchrun, evaluation.

Layout of the output directory::

    data/                      the synthetic data set (when the spec asks for one)
    runs/teacher/              the teacher's training run (when the spec trains it)
    runs/<variant>/seed<k>/    one student run: checkpoints/, metrics.jsonl, config.yaml
    teacher_cache/             the teacher's rows (with ``teacher_cache: true``), built once
    logs/<run>.log             the run's torchrun output
    eval/<run>/                results.json, outcomes.npz (per-pair data), feature caches
    study.md, study.json, *.png   the report (:mod:`fr_distill.study.report`)

Every run goes through the real trainer (``python -m torch.distributed.run … -m fr_distill.cli
train``). A run whose final checkpoint is there and valid is reused, a run interrupted part
way resumes from its last checkpoint (the trainer's auto-resume), and an evaluation already
written for the same checkpoint is reused: running the same command again continues an
interrupted study. A run directory written with another config is refused, not reused. A run
that fails (training or evaluation) is recorded with its log path and the others go on.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fr_distill.checkpoint.files import CheckpointStore
from fr_distill.config import KD_TERMS, Config, ConfigError, load_config, to_dict
from fr_distill.engine.plan import CHECKPOINT_SUBDIR
from fr_distill.eval.runner import evaluate_model
from fr_distill.models import load_frozen_model
from fr_distill.paths import atomic_writer
from fr_distill.study.report import write_report
from fr_distill.study.runs import TEACHER, StudyRun
from fr_distill.study.spec import IJBSet, StudyError, StudySpec, student_config
from fr_distill.synthetic import generate

CACHE = "teacher_cache"


def say(message: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


# ----------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------
@dataclass
class StudyData:
    train: str | list[str]
    bin_sets: list[str]
    ijb_sets: list[IJBSet]


def prepare_data(spec: StudySpec, out: Path) -> StudyData:
    """The spec's data: the synthetic set generated into ``out/data`` (reused when already
    there), or the user's sets as named."""
    if spec.synthetic is None:
        return StudyData(spec.train, spec.bin_sets, spec.ijb_sets)
    data = out / "data"
    say(f"synthetic data set -> {data}")
    manifest = generate(data, **spec.synthetic)
    ijb_name = manifest["parameters"]["ijb_name"]
    return StudyData(str(data / "train"), sorted(str(p) for p in data.glob("*.bin")),
                     [IJBSet(str(data / "ijb" / ijb_name), ijb_name)])


def effective_settings(config: Config) -> dict:
    """``config`` as a dict without the settings of the loss terms that are off (a term's keys
    but its weight; the memory bank without RPSD; balancing when disabled): a changed default
    of a term a run does not use does not make it another run."""
    settings = to_dict(config)
    loss = settings["loss"]
    for term in KD_TERMS:
        if loss[term]["weight"] <= 0:
            loss[term] = {"weight": loss[term]["weight"]}
    if loss["rpsd"]["weight"] <= 0:
        del loss["bank"]
    if not loss["balance"]["enabled"]:
        del loss["balance"]
    return settings


def _check_config_unchanged(run: StudyRun) -> None:
    """A run directory holds the run of exactly this config, or nothing yet. The saved config
    is read through the current schema, so keys added since (at their defaults) do not count
    as a change, nor do settings of loss terms the run does not use
    (:func:`effective_settings`)."""
    saved = run.run_dir / "config.yaml"
    if not saved.is_file():
        return
    try:
        same = effective_settings(load_config(saved)) == effective_settings(run.config)
    except ConfigError:
        same = False
    if not same:
        raise StudyError(f"{run.run_dir} holds a run with another config than the study's "
                         f"'{run.name}' (see its config.yaml); remove that directory or choose "
                         f"another --out")


def plan_runs(spec: StudySpec, data: StudyData, out: Path) -> tuple[StudyRun | None, list[StudyRun]]:
    """The teacher run (None when the spec names a teacher file) and the student runs, in
    the order they train: seed by seed, every variant within a seed, so that a study stopped
    early holds complete seeds."""
    # a list as a YAML flow sequence of quoted paths (JSON), a single path as it is
    common = [f"data.train={data.train if isinstance(data.train, str) else json.dumps(data.train)}"]
    teacher = None
    if spec.teacher_config is not None:
        run_dir = out / "runs" / TEACHER
        overrides = common + [f"run.output_dir={run_dir}"]
        teacher = StudyRun(TEACHER, TEACHER, None, load_config(spec.teacher_config, overrides),
                           spec.teacher_config, overrides, run_dir, out / "logs" / "teacher.log")
        teacher_file = teacher.final_checkpoint
    else:
        teacher_file = spec.teacher_path
    students = []
    for seed in spec.seeds:
        for variant in spec.variants:
            name = f"{variant}/seed{seed}"
            run_dir = out / "runs" / variant / f"seed{seed}"
            overrides = common + [f"teacher.path={teacher_file}", f"run.output_dir={run_dir}",
                                  *cache_overrides(spec, out)]
            try:
                config = student_config(spec, variant, seed, overrides)
            except ConfigError as err:
                raise StudyError(f"variant '{variant}': {err}") from None
            students.append(StudyRun(name, variant, seed, config, spec.student_config,
                                     [*spec.variants[variant], f"run.seed={seed}", *overrides],
                                     run_dir, out / "logs" / f"{variant}_seed{seed}.log"))
    for run in ([teacher] if teacher else []) + students:
        _check_config_unchanged(run)
    return teacher, students


def cache_overrides(spec: StudySpec, out: Path) -> list[str]:
    """The students' keys for the teacher cache (``teacher_cache: true``): float32 rows, which
    a run reads bitwise as the teacher computes them on the fly (METHOD §4)."""
    if not spec.teacher_cache:
        return []
    return [f"teacher.cache={out / CACHE}", "teacher.cache_dtype=float32"]


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def is_finished(run: StudyRun) -> bool:
    """The run's final checkpoint is there and is the newest valid one."""
    store = CheckpointStore(run.run_dir / CHECKPOINT_SUBDIR, keep_last=1)
    return run.steps in store.steps() and store.latest_valid() == run.final_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def training_command(config_path: Path, overrides: list[str], nproc: int,
                     command: str = "train") -> list[str]:
    """torchrun on the loopback interface running ``fr-distill train`` (or another command
    taking ``--config``: ``cache-teacher``), from the installed package, no checkout needed."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "fr_distill.cli",
            command, "--config", str(config_path), *overrides]


def _launch(command: list[str], log_path: Path, nproc: int) -> int:
    """Run ``command`` (a torchrun line) with its output appended to ``log_path``, one CPU
    thread per process; returns its exit status."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    with open(log_path, "a") as log:
        log.write(f"\n# {datetime.datetime.now().isoformat(timespec='seconds')} "
                  f"{' '.join(command)}\n")
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def train_run(run: StudyRun, nproc: int) -> None:
    """Train ``run`` unless it is finished; its output goes to ``run.log``. Sets the status."""
    if is_finished(run):
        run.status = "reused"
        return
    started = time.perf_counter()
    code = _launch(training_command(run.config_path, run.overrides, nproc), run.log, nproc)
    run.seconds = time.perf_counter() - started
    if code == 0 and is_finished(run):
        run.status = "trained"
    else:
        run.status = "failed"
        run.error = f"training exited with status {code}" if code else \
            "training ended without its final checkpoint"


def build_teacher_cache(spec: StudySpec, student: StudyRun, out: Path) -> None:
    """``teacher_cache: true``: the teacher's rows for every training sample, built once with
    the students' config (per-rank batch, precision, loader) by ``fr-distill cache-teacher``;
    a complete cache is verified and kept, an interrupted one completed."""
    if not spec.teacher_cache:
        return
    say(f"teacher cache -> {out / CACHE}")
    keep = [o for o in student.overrides if o.split("=", 1)[0] in
            ("data.train", "teacher.path", "teacher.cache", "teacher.cache_dtype")]
    log = out / "logs" / f"{CACHE}.log"
    code = _launch(training_command(spec.student_config, keep, spec.nproc, "cache-teacher"), log,
                   spec.nproc)
    if code != 0:
        raise StudyError(f"building the teacher cache {out / CACHE} failed (exit status {code});"
                         f" see {log}")


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def _save_outcomes(path: Path, outcomes: dict) -> None:
    arrays = {}
    for set_name, pairs in outcomes.get("bin", {}).items():
        arrays[f"bin/{set_name}/correct"] = pairs["correct"]
    for set_name, pairs in outcomes.get("ijb", {}).items():
        arrays[f"ijb/{set_name}/scores"] = pairs["scores"]
        arrays[f"ijb/{set_name}/labels"] = pairs["labels"]
    with atomic_writer(path) as handle:
        np.savez(handle, **arrays)


def load_outcomes(path: Path) -> dict:
    """``outcomes.npz`` back as ``{"bin": {set: {"correct"}}, "ijb": {set: {"scores", "labels"}}}``."""
    outcomes: dict = {"bin": {}, "ijb": {}}
    with np.load(path) as arrays:
        for key in arrays.files:
            kind, set_name, field_name = key.split("/")
            outcomes[kind].setdefault(set_name, {})[field_name] = arrays[key]
    return outcomes


def evaluate_run(run: StudyRun, data: StudyData, out: Path, batch_size: int = 128) -> None:
    """Evaluate the run's model on every set (reused when already done for that file)."""
    eval_dir = out / "eval" / run.name.replace("/", "_")
    model_file = run.evaluated_file
    key = {"checkpoint": str(model_file), "mtime_ns": model_file.stat().st_mtime_ns,
           "bin_sets": data.bin_sets, "ijb_sets": [[s.root, s.name] for s in data.ijb_sets]}
    done, results, outcomes_file = eval_dir / "done.json", eval_dir / "results.json", \
        eval_dir / "outcomes.npz"
    if done.is_file() and json.loads(done.read_text()) == key:
        run.results = json.loads(results.read_text())
        run.outcomes = load_outcomes(outcomes_file)
        return
    done.unlink(missing_ok=True)
    # an evaluation-only copy: channels_last runs its forward 1.8x faster on CPUs (the trainer
    # keeps NCHW on CPUs for its backward, see precision.image_layout)
    model = load_frozen_model(str(model_file), device="cpu").to(memory_format=torch.channels_last)
    outcomes: dict = {}
    evaluate_model(model, "cpu", data.bin_sets, [(s.root, s.name) for s in data.ijb_sets],
                   eval_dir, batch_size=batch_size, cache_key=key, outcomes=outcomes)
    _save_outcomes(outcomes_file, outcomes)
    done.write_text(json.dumps(key) + "\n")
    run.results = json.loads(results.read_text())  # as a reused evaluation reads them
    run.outcomes = load_outcomes(outcomes_file)


# ----------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------
class Progress:
    """The study's progress line: which run is active, elapsed time and the ETA (from the
    seconds per training step of the runs trained so far in this invocation)."""

    def __init__(self, runs: list[StudyRun]) -> None:
        self.runs = runs
        self.started = time.perf_counter()
        self.seconds = 0.0
        self.steps = 0

    def start(self, index: int, run: StudyRun, action: str) -> None:
        remaining = sum(r.steps for r in self.runs[index:] if r.status == "pending")
        eta = _duration(remaining * self.seconds / self.steps) if self.steps else "?"
        say(f"({index + 1}/{len(self.runs)}) {action} {run.name} | elapsed "
            f"{_duration(time.perf_counter() - self.started)} | ETA {eta}")

    def finished(self, run: StudyRun, seconds: float) -> None:
        if run.status == "trained" and run.name != TEACHER:
            self.seconds += seconds
            self.steps += run.steps


def _run_one(run: StudyRun, spec: StudySpec, data: StudyData, out: Path,
             progress: Progress, index: int, train: bool) -> None:
    if not train and not is_finished(run):
        run.status = "not run"
        say(f"({index + 1}/{len(progress.runs)}) {run.name}: not run (--report-only)")
        return
    progress.start(index, run, "reusing" if is_finished(run) else "training")
    started = time.perf_counter()
    train_run(run, spec.nproc)
    if run.ok:
        try:
            evaluate_run(run, data, out)
        except Exception as err:  # noqa: BLE001 (a failed evaluation must not stop the study)
            run.status, run.error = "failed", f"evaluation: {type(err).__name__}: {err}"
    progress.finished(run, time.perf_counter() - started)
    line = f"{run.name}: {run.status}"
    if run.status == "failed":
        line += f" ({run.error}; log: {run.log})"
    say(line)


def run_study(spec: StudySpec, out_dir: str | os.PathLike, train: bool = True) -> dict:
    """Run (or continue) the study ``spec`` into ``out_dir``; returns the report's JSON.

    With ``train=False`` (``--report-only``) nothing is trained: the report covers the runs
    already finished and lists the others as not run."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    data = prepare_data(spec, out)
    teacher, students = plan_runs(spec, data, out)
    runs = ([teacher] if teacher else []) + students
    progress = Progress(runs)
    if teacher is None and train:
        build_teacher_cache(spec, students[0], out)
    for index, run in enumerate(runs):
        _run_one(run, spec, data, out, progress, index, train)
        if run is teacher and not run.ok:
            raise StudyError(f"the teacher is {run.status} ({run.error or 'no final checkpoint'}); "
                             f"see {run.log}")
        if run is teacher and train:
            build_teacher_cache(spec, students[0], out)
    if teacher is None:
        teacher = _external_teacher(spec, data, out)
    report = write_report(spec, out, teacher, students, time.perf_counter() - wall)
    say(f"done in {_duration(time.perf_counter() - wall)}; report: {out / 'study.md'}")
    return report


def _external_teacher(spec: StudySpec, data: StudyData, out: Path) -> StudyRun:
    """The spec's teacher file, evaluated like a run (it is not trained here)."""
    path = spec.teacher_path
    config = load_config(spec.student_config, [f"teacher.path={path}"])
    run = StudyRun(TEACHER, TEACHER, None, config, spec.student_config, [], path.parent,
                   out / "logs" / "teacher.log", status="reused", model_file=path)
    evaluate_run(run, data, out)
    return run
