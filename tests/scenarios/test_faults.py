"""Fault injection: what the user sees when a run meets a fault or bad input, and that nothing
already saved is lost. Each case is a row of docs/RELIABILITY.md.

Runs are tiny (IResNet-18 at width 1/8, a few steps on the synthetic set, one process);
a fault is injected by preparing the run directory, editing a file while the run trains
(a callback), or making a write fail (monkeypatch)."""
from __future__ import annotations

import errno
import fcntl
import io
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (REPO, TAG_VARIABLE, lock_is_free, tagged_processes, torchrun_env,
                      wait_until)
from fr_distill.config import ConfigError, load_config
from fr_distill.checkpoint import files as checkpoint
from fr_distill.engine.trainer import train
from fr_distill.engine.callbacks import Callback
from fr_distill.commands.train import train_main
from fr_distill.engine.faults import TrainingError
from fr_distill.engine.run_dir import EARLIER_RUNS, LOCK_FILE, RunDirError
from fr_distill.errors import FrDistillError
from fr_distill.eval.errors import EvalDataError
from fr_distill.models import build_student
from fr_distill.paths import file_sha256


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.train={data / 'train'}", "data.loader=torch", "data.num_workers=0",
            "data.batch_size=8", "model.width=0.125", "model.embedding_dim=32",
            "precision.amp=fp32", "loss.iled.weight=0", "loss.rpsd.weight=0",
            f"run.output_dir={out}", "logging.tensorboard=false", "logging.every_steps=1",
            "schedule.warmup_steps=0", *extra]


def run(data: Path, out: Path, *extra: str):
    return train(load_config(None, overrides(data, out, *extra)))


def steps_in(directory: Path) -> list[int]:
    return sorted(int(p.name[5:13]) for p in directory.glob("step_*.pt"))


# -- checkpoints belong to a run --------------------------------------------------------------
def test_fresh_start_moves_an_earlier_runs_checkpoints_aside(synthetic_data, tmp_path,
                                                             single_thread):
    """checkpoint.resume=false in a directory holding a run that got further: the new run's
    checkpoints are kept (before, pruning kept the old, higher steps and deleted the new
    ones), the old run is moved to earlier_runs/, and a later resume continues the new run."""
    out = tmp_path / "run"
    run(synthetic_data, out, "schedule.total_steps=4", "checkpoint.every_steps=2",
        "checkpoint.keep_last=1")
    old = checkpoint.load(out / "checkpoints" / "step_00000004.pt")
    result = run(synthetic_data, out, "schedule.total_steps=2", "checkpoint.every_steps=2",
                 "checkpoint.keep_last=1", "checkpoint.resume=false", "optim.lr=0.05")
    assert result.status == "completed" and steps_in(out / "checkpoints") == [2]
    (aside,) = (out / EARLIER_RUNS).iterdir()
    assert steps_in(aside / "checkpoints") == [4]
    assert json.loads((aside / "SET_ASIDE.json").read_text()) == {"reason": "checkpoint.resume=false"}
    moved = checkpoint.load(aside / "checkpoints" / "step_00000004.pt")
    assert all(torch.equal(moved["student"][k], v) for k, v in old["student"].items())
    assert [json.loads(line)["step"] for line in (aside / "metrics.jsonl").read_text().splitlines()
            if "eval" not in line] == [1, 2, 3, 4]
    resumed = run(synthetic_data, out, "schedule.total_steps=3", "checkpoint.every_steps=1",
                  "checkpoint.keep_last=1", "optim.lr=0.05")
    assert (resumed.start_step, resumed.step) == (2, 3)


def test_all_corrupt_checkpoints_are_set_aside_and_the_new_run_keeps_its_own(
        synthetic_data, tmp_path, single_thread):
    """Every checkpoint fails its checksum: the run starts fresh (as before) but no longer
    deletes what it writes, so a requeued job makes progress."""
    out = tmp_path / "run"
    run(synthetic_data, out, "schedule.total_steps=4", "checkpoint.every_steps=2")
    for path in (out / "checkpoints").glob("step_*.pt"):
        path.write_bytes(path.read_bytes()[:1000])
    result = run(synthetic_data, out, "schedule.total_steps=2", "checkpoint.every_steps=1",
                 "checkpoint.keep_last=1")
    assert (result.start_step, result.step) == (0, 2)
    assert steps_in(out / "checkpoints") == [2]
    (aside,) = (out / EARLIER_RUNS).iterdir()
    assert steps_in(aside / "checkpoints") == [2, 4]
    assert "no valid checkpoint" in (aside / "SET_ASIDE.json").read_text()


def test_a_second_run_on_the_same_directory_is_refused(synthetic_data, tmp_path, single_thread):
    """Another process holds the run directory's lock: one line naming it, exit status 2,
    and nothing of the running run is touched."""
    out = tmp_path / "run"
    run(synthetic_data, out, "schedule.total_steps=2", "checkpoint.every_steps=2")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(out / LOCK_FILE)!r}, os.O_RDWR)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0)\n"
         "os.write(fd, b'pid 4242 on node7 since 2026-11-30T10:00:00')\n"
         "print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError) as err:
            run(synthetic_data, out, "schedule.total_steps=4", "checkpoint.resume=false")
    finally:
        holder.kill()
        holder.wait()
    assert str(err.value) == (f"run.output_dir {out} is in use by another run (pid 4242 on "
                              f"node7 since 2026-11-30T10:00:00); wait for it, stop it, or "
                              f"choose another run.output_dir")
    assert err.value.exit_code == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert not (out / EARLIER_RUNS).exists()
    fd = os.open(out / LOCK_FILE, os.O_RDWR)  # released: the lock can be taken again
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


def test_a_checkpoint_directory_replaced_by_a_file_fails_before_training(
        synthetic_data, tmp_path, capsys):
    """checkpoints/ is a file: one line, exit status 2, from the command line and its
    --dry-run, before any step (before, a traceback at the first checkpoint)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a directory")
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    code = train_main(["--config", str(config), *overrides(synthetic_data, out,
                                                          "schedule.total_steps=2")])
    message = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in message
    assert message == (f"error: config key 'run.output_dir (its checkpoints/)': "
                       f"{out / 'checkpoints'} is a file, not a directory")
    assert not (out / "metrics.jsonl").exists()
    assert train_main(["--config", str(config), "--dry-run",
                       *overrides(synthetic_data, out)]) == 2
    assert capsys.readouterr().err.strip() == message


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(
        synthetic_data, tmp_path, monkeypatch, single_thread):
    """ENOSPC in the middle of writing the step-4 checkpoint: one line naming the file, exit
    status 1, no partial file left behind, step 2 intact, and the run resumes from it."""
    out = tmp_path / "run"
    real_write = checkpoint.atomic_write

    def full_disk(path, data, mode):
        if "step_00000004" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(path, data, mode)

    monkeypatch.setattr(checkpoint, "atomic_write", full_disk)
    extra = ("schedule.total_steps=4", "checkpoint.every_steps=2")
    with pytest.raises(checkpoint.CheckpointError) as err:
        run(synthetic_data, out, *extra)
    assert str(err.value) == (f"{out / 'checkpoints' / 'step_00000004.pt'}: cannot be written "
                              f"(No space left on device); the checkpoints already saved are "
                              f"untouched")
    assert err.value.exit_code == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000002.pt", "step_00000002.pt.sha256"]
    monkeypatch.setattr(checkpoint, "atomic_write", real_write)
    result = run(synthetic_data, out, *extra)
    assert (result.start_step, result.step) == (2, 4)


def test_a_full_disk_while_writing_a_sharded_checkpoint_keeps_the_previous_one(
        synthetic_data, tmp_path, monkeypatch, single_thread):
    """checkpoint.format=dcp: ENOSPC while DCP flushes the step-4 rank file: the same one
    line naming the directory, the step-4 directory never committed, and the run resumes
    from step 2."""
    out = tmp_path / "run"
    real_fsync = os.fsync

    def full_disk(fd):
        if "step_00000004" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    extra = ("schedule.total_steps=4", "checkpoint.every_steps=2", "checkpoint.format=dcp")
    with pytest.raises(checkpoint.CheckpointError) as err:
        run(synthetic_data, out, *extra)
    assert str(err.value) == (f"{out / 'checkpoints' / 'step_00000004'}: cannot be written "
                              f"(No space left on device); the checkpoints already saved are "
                              f"untouched")
    store = checkpoint.CheckpointStore(out / "checkpoints", keep_last=3, sharded=True)
    assert store.steps() == [2] and store.latest_valid() == out / "checkpoints" / "step_00000002"
    monkeypatch.setattr(os, "fsync", real_fsync)
    result = run(synthetic_data, out, *extra)
    assert (result.start_step, result.step) == (2, 4)


# -- checkpoints that refer to code, are cut short or do not fit the run ----------------------
@pytest.fixture(scope="module")
def finished_runs(synthetic_data, tmp_path_factory) -> dict[str, Path]:
    """Run directories of a 2-step run with a checkpoint at each step, one per
    checkpoint.format ("file", "dcp"); a test copies the one it changes (:func:`copy_run`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {fmt: tmp_path_factory.mktemp("finished") / fmt for fmt in ("file", "dcp")}
        for fmt, out in runs.items():
            run(synthetic_data, out, "schedule.total_steps=2", "checkpoint.every_steps=1",
                f"checkpoint.format={fmt}")
        return runs
    finally:
        torch.set_num_threads(before)


def copy_run(runs: dict[str, Path], fmt: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(runs[fmt], tmp_path / "run"))


class RunsCode:
    """Pickled, a call of os.system that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(directory: Path, name: str, payload: bytes) -> None:
    """Replace file ``name`` of a checkpoint directory, with SHA256SUMS to match: whoever can
    write the one can write the other."""
    (directory / name).write_bytes(payload)
    names = sorted(p.name for p in directory.iterdir() if p.name != "SHA256SUMS")
    (directory / "SHA256SUMS").write_text(
        "".join(f"{file_sha256(directory / n)}  {n}\n" for n in names))


def checkpoint_warnings(action) -> list[str]:
    """The warnings of fr_distill.checkpoint.files while ``action()`` runs (fr_distill's
    loggers do not propagate)."""
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger(checkpoint.__name__).addHandler(handler)
    try:
        action()
    finally:
        logging.getLogger(checkpoint.__name__).removeHandler(handler)
    return warnings


def _read_with_load(directory: Path, data: Path, tmp_path: Path, capsys) -> str:
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(directory)
    return str(err.value)


def _read_with_export(directory: Path, data: Path, tmp_path: Path, capsys) -> str:
    from fr_distill.commands.export import export_main

    assert export_main(["--checkpoint", str(directory), "--out", str(tmp_path / "export")]) == 2
    return capsys.readouterr().err


def _read_with_eval(directory: Path, data: Path, tmp_path: Path, capsys) -> str:
    from fr_distill.commands.eval import eval_main

    assert eval_main(["--model", str(directory), "--bin", str(data / "synth_lfw.bin"),
                      "--out", str(tmp_path / "eval")]) == 2
    return capsys.readouterr().err


def _read_in_training(key: str):
    def read(directory: Path, data: Path, tmp_path: Path, capsys) -> str:
        with pytest.raises(FrDistillError) as err:
            run(data, tmp_path / "other", "schedule.total_steps=1", f"{key}={directory}")
        assert err.value.exit_code == 2
        return str(err.value)
    return read


def _read_on_resume(directory: Path, data: Path, tmp_path: Path, capsys) -> str:
    """The run whose newest checkpoint ``directory`` is resumes from the previous one."""
    result = []
    warnings = checkpoint_warnings(lambda: result.append(run(
        data, directory.parent.parent, "schedule.total_steps=3", "checkpoint.every_steps=1",
        "checkpoint.format=dcp")))
    assert (result[0].start_step, result[0].step) == (1, 3)
    return "\n".join(warnings)


REFUSED = "refusing to unpickle code from {file}: it references {name}"


@pytest.mark.parametrize("read, expected", [
    (_read_with_load, "{dir}: " + REFUSED),
    (_read_with_export, "error: {dir}: " + REFUSED + "\n"),
    (_read_with_eval, "error: {dir}: " + REFUSED + "\n"),
    (_read_in_training("teacher.path"), "{dir}: " + REFUSED),
    (_read_in_training("model.init"), "model.init: {dir}: " + REFUSED),
    (_read_on_resume, "checkpoint {dir} is unusable (" + REFUSED + "); trying the previous one"),
], ids=["checkpoint.load", "export", "eval", "teacher.path", "model.init", "resume"])
def test_a_checkpoint_index_that_runs_code_is_refused_wherever_it_is_read(
        finished_runs, synthetic_data, tmp_path, capsys, single_thread, read, expected):
    """checkpoint.format=dcp: .metadata, which DCP itself reads with pickle.load, replaced by a
    pickle calling os.system, SHA256SUMS updated to match: nothing runs, one line names the
    file and the global, and a resumed run falls back to the previous checkpoint (before, the
    command ran through every one of these)."""
    directory = copy_run(finished_runs, "dcp", tmp_path) / "checkpoints" / "step_00000002"
    marker = tmp_path / "ran"
    plant(directory, ".metadata", pickle.dumps(RunsCode(marker)))
    message = read(directory, synthetic_data, tmp_path, capsys)
    assert message == expected.format(dir=directory, file=".metadata",
                                      name=f"{os.system.__module__}.system")
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["dcp", "file"])
def test_a_checkpoint_that_unpickles_code_is_one_line_naming_the_file(
        finished_runs, synthetic_data, tmp_path, capsys, single_thread, fmt):
    """state.pt of a checkpoint directory, or a step_N.pt file, pickling a call of os.system
    (its checksum to match): one line naming the file and the global, from checkpoint.load
    and from a resume, never torch's advice to retry with weights_only=False (before: six
    lines)."""
    out = copy_run(finished_runs, fmt, tmp_path)
    marker = tmp_path / "ran"
    payload = {"format": checkpoint.FORMAT, "step": 2, "rng": RunsCode(marker)}
    if fmt == "dcp":
        path = out / "checkpoints" / "step_00000002"
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        plant(path, "state.pt", buffer.getvalue())
        expected = f"{path}: refusing to unpickle code from state.pt: it references posix.system"
    else:
        path = out / "checkpoints" / "step_00000002.pt"
        checkpoint.save(payload, path)
        expected = f"{path}: refusing to unpickle code: it references posix.system"
    expected = expected.replace("posix", os.system.__module__)
    assert checkpoint.verify(path) is None
    message = _read_with_load(path, out, tmp_path, capsys)
    assert message == expected
    with pytest.raises(checkpoint.CheckpointError) as err:
        run(synthetic_data, out, "schedule.total_steps=3", f"checkpoint.format={fmt}")
    assert str(err.value) == expected
    assert not marker.exists()


@pytest.mark.parametrize("fmt, damage, reason", [
    ("dcp", lambda p: (p / "SHA256SUMS").write_text((p / "SHA256SUMS").read_text()[:100]),
     "SHA256SUMS line 2 is not '<sha256>  <file>' (cut short?)"),
    ("file", lambda p: p.with_name(p.name + ".sha256").write_bytes(b"\xff\xfe\x00garbage"),
     "sha256 mismatch (truncated or corrupt; {size} bytes)"),
], ids=["manifest-cut-mid-line", "sidecar-not-text"])
def test_a_checksum_file_cut_short_falls_back_to_the_previous_checkpoint(
        finished_runs, tmp_path, fmt, damage, reason):
    """The newest checkpoint's SHA256SUMS cut in the middle of a line (or a sidecar that is
    not text): one warning naming it, and the previous checkpoint is the one to resume
    (before: a ValueError traceback, no fallback)."""
    out = copy_run(finished_runs, fmt, tmp_path)
    store = checkpoint.CheckpointStore(out / "checkpoints", keep_last=3, sharded=fmt == "dcp")
    newest = store.step_path(2)
    damage(newest)
    found = []
    warnings = checkpoint_warnings(lambda: found.append(store.latest_valid()))
    assert found == [store.step_path(1)]
    size = newest.stat().st_size
    assert warnings == [f"checkpoint {newest} is unusable ({reason.format(size=size)}); trying "
                        f"the previous one"]


def _index_naming_an_unlisted_file(directory: Path) -> bytes:
    """The checkpoint's own .metadata with its first entry's data moved to a file that
    SHA256SUMS does not list (so no checksum would have covered it)."""
    from fr_distill.checkpoint.sharded import read_metadata

    metadata = read_metadata(directory)
    next(iter(metadata.storage_data.values())).relative_path = "__9_0.distcp"
    return pickle.dumps(metadata)


@pytest.mark.parametrize("payload, reason", [
    (lambda d: pickle.dumps([1, 2]),
     ".metadata is not a DCP index (ValueError: a list, not a Metadata naming each entry's "
     "file)"),
    (_index_naming_an_unlisted_file, ".metadata names __9_0.distcp, which SHA256SUMS does not "
                                     "list"),
], ids=["not-an-index", "unlisted-file"])
def test_a_checkpoint_index_of_other_files_falls_back_to_the_previous_checkpoint(
        finished_runs, tmp_path, payload, reason):
    """checkpoint.format=dcp: a .metadata (its checksum to match) holding no DCP index, or
    one that sends DCP to a file SHA256SUMS does not list: one warning naming it, and the
    previous checkpoint is the one to resume (before: a traceback when read, or a file read
    that no checksum covered)."""
    out = copy_run(finished_runs, "dcp", tmp_path)
    store = checkpoint.CheckpointStore(out / "checkpoints", keep_last=3, sharded=True)
    newest = store.step_path(2)
    plant(newest, ".metadata", payload(newest))
    found = []
    warnings = checkpoint_warnings(lambda: found.append(store.latest_valid()))
    assert found == [store.step_path(1)]
    assert warnings == [f"checkpoint {newest} is unusable ({reason}); trying the previous one"]


def _student_state(data: Path, *change: str) -> dict:
    model = load_config(None, overrides(data, Path("unused"), *change)).model
    return build_student(model.name, model.embedding_dim, model.width, model.dropout).state_dict()


def _differences(a: dict, b: dict) -> int:
    """How many tensors differ between two state dicts: in one only, or in shape."""
    return len(a.keys() ^ b.keys()) + sum(a[k].shape != b[k].shape for k in a.keys() & b.keys())


@pytest.mark.parametrize("fmt, change, first", [
    ("file", "model.width=0.25",
     "'student/conv1.weight' is [8, 3, 3, 3] in the checkpoint, [16, 3, 3, 3] in this run"),
    ("dcp", "model.width=0.25",
     "'student/conv1.weight' is [8, 3, 3, 3] in the checkpoint, [16, 3, 3, 3] in this run"),
    ("dcp", "model.name=mobilefacenet",
     "this run's 'student/layers.0.layers.0.weight' [16, 3, 3, 3] is not in the checkpoint"),
], ids=["file-width", "dcp-width", "dcp-backbone"])
def test_resuming_a_run_of_another_student_is_one_line_before_training(
        finished_runs, synthetic_data, tmp_path, single_thread, fmt, change, first):
    """The same run directory resumed with another model.width or model.name: exit status
    2 before any step, one line naming the checkpoint, the first tensor that differs with
    both shapes and how many others differ (before: 271 lines of size mismatches; with dcp
    and another backbone, a backbone tensor called "this run's head")."""
    out = copy_run(finished_runs, fmt, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}
    records = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(checkpoint.CheckpointError) as err:
        run(synthetic_data, out, "schedule.total_steps=3", f"checkpoint.format={fmt}", change)
    others = _differences(_student_state(synthetic_data), _student_state(synthetic_data, change))
    newest = out / "checkpoints" / ("step_00000002" if fmt == "dcp" else "step_00000002.pt")
    assert str(err.value) == (f"{newest} does not fit this run: {first} (and {others - 1} other "
                              f"tensors differ); resume with the settings it was written with, "
                              f"or start afresh (checkpoint.resume=false)")
    assert err.value.exit_code == 2
    assert {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()} == before
    assert (out / "metrics.jsonl").read_bytes() == records


def test_resuming_with_another_optimizer_layout_is_one_line_before_training(
        finished_runs, synthetic_data, tmp_path, single_thread):
    """optim.no_decay_bn_bias switched on for a resume: two parameter groups where the
    checkpoint has one (before: torch's ValueError traceback)."""
    out = copy_run(finished_runs, "file", tmp_path)
    with pytest.raises(checkpoint.CheckpointError) as err:
        run(synthetic_data, out, "schedule.total_steps=3", "optim.no_decay_bn_bias=true")
    model = load_config(None, overrides(synthetic_data, out)).model
    student = build_student(model.name, model.embedding_dim, model.width, model.dropout)
    dims = [p.dim() for p in student.parameters() if p.requires_grad] + [2, 1]  # + the head
    decayed = sum(d > 1 for d in dims)
    assert str(err.value) == (
        f"{out / 'checkpoints' / 'step_00000002.pt'} does not fit this run: its optimizer has "
        f"[{len(dims)}] parameters per group, this run's [{decayed}, {len(dims) - decayed}] "
        f"(another optim.no_decay_bn_bias or objective); resume with the settings it was "
        f"written with, or start afresh (checkpoint.resume=false)")
    assert err.value.exit_code == 2


# -- a killed run's child processes ----------------------------------------------------------
WORKER = REPO / "tests" / "workers" / "worker_train_run.py"

def run_tagged(command: list[str], tag: str, log: Path) -> tuple[int, str]:
    """Run ``command`` with ``tag`` (:func:`conftest.process_tag`), its output to ``log`` (not
    a pipe, which a surviving child would keep open); its exit status and the log's end."""
    with open(log, "w") as out:
        status = subprocess.run(command, env=torchrun_env({TAG_VARIABLE: tag}), stdout=out,
                                stderr=subprocess.STDOUT, timeout=300).returncode
    return status, log.read_text()[-3000:]


#: A process that locks a directory (argv[2]) as a run does, starts a DALI loader on the
#: folder argv[1] with two Python workers started by argv[3] (fork; spawn, as when CUDA is
#: initialized) and waits to be killed.
DALI_LOADER_HOLDING_A_LOCK = """
import sys, time
from pathlib import Path
import torch
from fr_distill.config import DataConfig
from fr_distill.data import build_train_loader, preflight
from fr_distill.engine.run_dir import lock_directory
if sys.argv[3] == "spawn":
    torch.cuda.is_initialized = lambda: True
lock_directory(Path(sys.argv[2]))
cfg = DataConfig(train=sys.argv[1], batch_size=4, num_workers=2, loader="dali")
batches = build_train_loader(cfg, preflight(cfg), 0, 1, "cpu", 0).iterate(0)
next(batches)
print("running", flush=True)
time.sleep(600)
"""


#: A process that locks a directory (argv[1]) as a run does, forks a child as DALI starts its
#: workers (the child sleeps), prints the child's pid and waits to be killed.
FORKS_A_CHILD_WHILE_LOCKED = """
import os, sys, time
from pathlib import Path
from fr_distill.engine.run_dir import lock_directory
lock_directory(Path(sys.argv[1]))
child = os.fork()
if child == 0:
    time.sleep(600)
    os._exit(0)
print(child, flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(120)
def test_a_child_forked_by_a_run_never_holds_its_lock(tmp_path, process_tag):
    """A process holding a run's lock forks a child and is SIGKILLed: while the child lives
    on, the lock is free (before, the child shared the lock's open file description and
    held it until it exited)."""
    proc = subprocess.Popen([sys.executable, "-c", FORKS_A_CHILD_WHILE_LOCKED, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True,
                            env=torchrun_env({TAG_VARIABLE: process_tag}))
    try:
        child = int(proc.stdout.readline())
        assert not lock_is_free(tmp_path)
    finally:
        proc.kill()
        proc.wait()
    assert wait_until(lambda: lock_is_free(tmp_path), timeout=10)
    os.kill(child, 0)  # the child is alive, and does not hold the lock
    assert tagged_processes(process_tag) == [child]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_a_killed_dali_loaders_workers_die_with_it_and_never_hold_its_lock(
        synthetic_data, tmp_path, process_tag, start):
    """SIGKILL to a process holding a run's lock while its DALI workers (forked, or spawned)
    wait for tasks: the workers exit at once (before, they lived on, reparented, ignoring
    SIGTERM) and the lock is free (before, forked ones kept it, refusing every rerun)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", DALI_LOADER_HOLDING_A_LOCK, str(synthetic_data / "train"),
         str(tmp_path), start], stdout=subprocess.PIPE, text=True,
        env=torchrun_env({TAG_VARIABLE: process_tag}))
    try:
        assert proc.stdout.readline().strip() == "running"
        assert len(tagged_processes(process_tag)) >= 3  # the process and its two workers
        assert not lock_is_free(tmp_path)
    finally:
        proc.kill()
        proc.wait()
    assert wait_until(lambda: not tagged_processes(process_tag)), tagged_processes(process_tag)
    assert lock_is_free(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_sigkilled_dali_run_leaves_no_worker_or_lock_and_its_rerun_resumes(
        synthetic_data, tmp_path, process_tag):
    """A one-rank run on the DALI loader (two Python workers, as by default) SIGKILLed after
    step 1: no process of it is left, its lock is free, and the same command again resumes
    from the step-1 checkpoint and completes (before: 'in use by another run (pid N)', N
    dead, exit 2, for as long as the orphaned workers lived)."""
    out = tmp_path / "run"
    command = [sys.executable, str(WORKER), "--fault", "kill", "--fault-step", "1",
               "--fault-rank", "0", "--marker", str(tmp_path / "killed_once"),
               *overrides(synthetic_data, out, "data.loader=dali", "data.num_workers=2",
                          "schedule.total_steps=2", "checkpoint.every_steps=1")]
    killed, log = run_tagged(command, process_tag, tmp_path / "killed.log")
    assert killed == -signal.SIGKILL, log
    assert wait_until(lambda: not tagged_processes(process_tag)), tagged_processes(process_tag)
    assert lock_is_free(out)
    rerun, log = run_tagged(command, process_tag, tmp_path / "rerun.log")
    assert rerun == 0, log
    result = json.loads((out / "result.json").read_text())
    assert (result["status"], result["start_step"], result["step"]) == ("completed", 1, 2)
    assert wait_until(lambda: not tagged_processes(process_tag)), tagged_processes(process_tag)


#: ``fr-distill cache-teacher`` SIGKILLing itself once its first shard is recorded.
CACHE_BUILD_KILLED_AFTER_A_SHARD = """
import os, signal, sys
from fr_distill.commands.cache_teacher import cache_teacher_main
from fr_distill.teacher_cache import build
finish = build._finish_shard
def finish_and_die(*args):
    finish(*args)
    os.kill(os.getpid(), signal.SIGKILL)
build._finish_shard = finish_and_die
sys.exit(cache_teacher_main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_sigkilled_cache_build_leaves_no_lock_and_its_rerun_finishes(
        synthetic_data, teacher_file, tmp_path, process_tag):
    """``fr-distill cache-teacher`` on the DALI loader SIGKILLed after its first shard: no
    process of it is left, the cache's lock is free and the command again finishes the
    cache (before: 'in use by another cache build', exit 2)."""
    from fr_distill.teacher_cache.store import read_manifest

    cache = tmp_path / "cache"
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    args = ["--config", str(config), "--shard-samples", "100",
            f"data.train={synthetic_data / 'train'}", "data.loader=dali", "data.num_workers=2",
            "data.batch_size=32", f"teacher.path={teacher_file}", "teacher.name=iresnet18", "teacher.width=0.125",
            "teacher.embedding_dim=32", f"teacher.cache={cache}", "precision.amp=fp32"]
    killed, log = run_tagged([sys.executable, "-c", CACHE_BUILD_KILLED_AFTER_A_SHARD, *args],
                             process_tag, tmp_path / "killed.log")
    assert killed == -signal.SIGKILL, log
    assert sorted(read_manifest(cache)["shards"]) == ["0"]
    assert wait_until(lambda: not tagged_processes(process_tag)), tagged_processes(process_tag)
    assert lock_is_free(cache)
    rerun, log = run_tagged([sys.executable, "-m", "fr_distill.cli", "cache-teacher", *args],
                            process_tag, tmp_path / "rerun.log")
    assert rerun == 0, log
    manifest = read_manifest(cache)
    assert manifest["complete"] and sorted(manifest["shards"]) == ["0", "1"]


# -- corrupt training images -----------------------------------------------------------------
@pytest.fixture
def corrupt_body_folder(tmp_path) -> tuple[Path, Path]:
    """A training folder (6 identities × 8 JPEGs) in which one JPEG keeps its header and end
    marker but loses half of its compressed body: the header pre-flight passes it."""
    from conftest import write_jpeg_folder

    root = write_jpeg_folder(tmp_path / "train", num_classes=6, per_class=8)
    bad = root / "id003" / "5.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) // 2] + b"\xff\xd9")
    return root, bad


def data_overrides(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.train={root}", "data.num_workers=2", "data.batch_size=8", "model.width=0.125",
            "model.embedding_dim=32", "precision.amp=fp32", "loss.iled.weight=0",
            "loss.rpsd.weight=0", f"run.output_dir={out}", "logging.tensorboard=false",
            "schedule.warmup_steps=0", "schedule.total_steps=2", *extra]


@pytest.mark.parametrize("loader, check", [("dali", "auto"), ("torch", "on")])
def test_a_corrupt_jpeg_body_is_named_before_training(corrupt_body_folder, tmp_path, loader,
                                                      check, single_thread):
    """DALI decodes such an image with only libjpeg's warning on stderr, naming no file: the
    decode check (on by default with DALI) names it before the first step."""
    from fr_distill.data import DataError

    root, bad = corrupt_body_folder
    cfg = load_config(None, data_overrides(root, tmp_path / "run", f"data.loader={loader}",
                                           f"data.decode_check={check}"))
    with pytest.raises(DataError) as err:
        train(cfg)
    assert str(err.value) == (f"{bad}: cannot decode image (Corrupt JPEG data: premature end of "
                              f"data segment); run tools/validate_data.py for the full list or "
                              f"set data.skip_bad=true to skip bad records")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_skip_bad_leaves_a_corrupt_jpeg_out_of_training(corrupt_body_folder, tmp_path, loader,
                                                        single_thread):
    """With data.skip_bad the decode check runs for either loader (auto): the image is left
    out and counted instead of stopping the PyTorch loader mid-run."""
    root, bad = corrupt_body_folder
    cfg = load_config(None, data_overrides(root, tmp_path / "run", f"data.loader={loader}",
                                           "data.skip_bad=true"))
    result = train(cfg)
    assert result.status == "completed"
    from fr_distill.data import preflight
    from fr_distill.data.decode_check import apply_decode_check

    kept = apply_decode_check(preflight(cfg.data), cfg.data, loader)
    assert kept.num_samples == 47 and kept.bad == [
        f"{bad}: cannot decode image (Corrupt JPEG data: premature end of data segment)"]
    assert b"id003/5.jpg" not in set(kept.samples.tolist())


# -- the teacher's embedding size -----------------------------------------------------------
def test_a_checkpoint_teacher_brings_its_own_embedding_size(synthetic_data, tmp_path,
                                                            single_thread):
    """A 16-d fr_distill checkpoint as the teacher, teacher.embedding_dim left at its default
    512: a 16-d student trains (before, the config refused it); a 32-d student without a
    projector is refused before the first step, in the config's terms (before: at step 1,
    'f_t ... has shape [8, 16] ... expected [8, 512]')."""
    teacher = run(synthetic_data, tmp_path / "teacher", "schedule.total_steps=1",
                  "model.embedding_dim=16")
    path = teacher.run_dir / "checkpoints" / "step_00000001.pt"
    distill = ("loss.iled.weight=1", f"teacher.path={path}", "schedule.total_steps=1")
    assert load_config(None, overrides(synthetic_data, tmp_path, *distill)).teacher.embedding_dim == 512
    result = run(synthetic_data, tmp_path / "student16", *distill, "model.embedding_dim=16")
    assert result.status == "completed" and result.objective.teacher_dim == 16
    from fr_distill.losses.errors import ObjectiveInputError

    with pytest.raises(ObjectiveInputError) as err:
        run(synthetic_data, tmp_path / "student32", *distill, "model.embedding_dim=32")
    assert str(err.value) == ("student embedding dim 32 (model.embedding_dim) differs from the "
                              "teacher's 16 with distillation terms iled: set model.projector=true, "
                              "or model.embedding_dim=16")
    assert not (tmp_path / "student32" / "metrics.jsonl").exists()


def test_a_teacher_below_min_accuracy_stops_the_run_before_the_first_step(
        synthetic_data, teacher_file, tmp_path, single_thread):
    """A random teacher measured on synth_lfw before the first step: below
    teacher.min_accuracy the run stops naming the set and the accuracy; without the floor it
    is logged, kept in the run's metrics, and training is bitwise unchanged by the check."""
    from fr_distill.eval.teacher_check import TeacherCheckError
    from fr_distill.eval import evaluate_bin_sets
    from fr_distill.models import load_frozen_model

    lfw = synthetic_data / "synth_lfw.bin"
    teacher = load_frozen_model(str(teacher_file), "iresnet18", 32, 0.125)
    accuracy = evaluate_bin_sets(teacher, [str(lfw)], "cpu")["synth_lfw"]["accuracy_mean"]
    assert 0.4 < accuracy < 0.9  # an untrained teacher: far from a trained one
    distill = ("loss.iled.weight=1", f"teacher.path={teacher_file}", "teacher.name=iresnet18",
               "teacher.width=0.125", "teacher.embedding_dim=32", "schedule.total_steps=2",
               "checkpoint.every_steps=2")
    with pytest.raises(TeacherCheckError) as err:
        run(synthetic_data, tmp_path / "refused", *distill, f"teacher.check_sets=[{lfw}]",
            "teacher.min_accuracy=0.95")
    assert str(err.value) == (f"teacher {teacher_file} reaches {accuracy:.4f} accuracy on "
                              f"synth_lfw, below teacher.min_accuracy=0.95: check the file, its "
                              f"architecture keys and, for an ONNX graph, the input "
                              f"normalization it expects")
    assert err.value.exit_code == 2 and not (tmp_path / "refused" / "metrics.jsonl").exists()
    checked = run(synthetic_data, tmp_path / "checked", *distill, f"teacher.check_sets=[{lfw}]")
    assert checked.metrics["teacher_check"] == {"synth_lfw": accuracy}
    unchecked = run(synthetic_data, tmp_path / "unchecked", *distill)
    assert "teacher_check" not in unchecked.metrics
    a, b = (checkpoint.load(r.run_dir / "checkpoints" / "step_00000002.pt")
            for r in (checked, unchecked))
    assert all(torch.equal(a["student"][k], v) for k, v in b["student"].items())


# -- evaluation sets ------------------------------------------------------------------------
@pytest.fixture
def bins(synthetic_data, tmp_path) -> dict[str, Path]:
    """A good copy of synth_lfw.bin, a truncated one, and an empty one (no pairs)."""
    import pickle

    good = tmp_path / "good.bin"
    shutil.copy(synthetic_data / "synth_lfw.bin", good)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(good.read_bytes()[:5000])
    empty = tmp_path / "empty.bin"
    empty.write_bytes(pickle.dumps(([], [])))
    return {"good": good, "truncated": truncated, "empty": empty}


@pytest.mark.parametrize("which, expected", [
    ("truncated", "truncated.bin: "), ("empty", "empty.bin: holds no pairs (empty issame_list)")])
def test_a_bad_evaluation_set_stops_the_run_before_training(synthetic_data, tmp_path, bins,
                                                             which, expected):
    """Read and decoded before the first step (before, the first evaluation raised, after
    training, and the step's checkpoint was never written)."""
    out = tmp_path / "run"
    with pytest.raises(EvalDataError) as err:
        run(synthetic_data, out, "schedule.total_steps=2", f"eval.bin_sets=[{bins[which]}]")
    assert "\n" not in str(err.value) and str(err.value).startswith(str(bins[which].parent))
    assert expected in str(err.value)
    assert not (out / "checkpoints").exists()
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    assert train_main(["--config", str(config), "--dry-run",
                       *overrides(synthetic_data, out, f"eval.bin_sets=[{bins[which]}]")]) == 2


def test_a_misspelled_best_metric_stops_the_run_before_training(synthetic_data, tmp_path, bins):
    with pytest.raises(ConfigError) as err:
        run(synthetic_data, tmp_path / "run", "schedule.total_steps=2",
            f"eval.bin_sets=[{bins['good']}]", "eval.best_metric=good/acuracy_mean")
    assert str(err.value) == ("config key 'eval.best_metric' is 'good/acuracy_mean', which no "
                              "evaluation produces; did you mean 'good/accuracy_mean'?")
    assert not (tmp_path / "run" / "checkpoints").exists()


class BreakFile(Callback):
    """Overwrites ``path`` with garbage after optimizer step ``at`` (a set edited on disk
    while the run trains) and restores it after step ``until``."""

    def __init__(self, path: Path, at: int, until: int = 10 ** 9) -> None:
        self.path, self.at, self.until = path, at, until
        self.original = path.read_bytes()

    def on_step_end(self, run, stats) -> None:
        if run.step == self.at:
            self.path.write_bytes(b"garbage")
        if run.step == self.until:
            self.path.write_bytes(self.original)


def test_a_failed_final_evaluation_keeps_the_final_checkpoint(synthetic_data, tmp_path, bins,
                                                              single_thread):
    out = tmp_path / "run"
    cfg = load_config(None, overrides(synthetic_data, out, "schedule.total_steps=3",
                                      "checkpoint.every_steps=100",
                                      f"eval.bin_sets=[{bins['good']}]"))
    with pytest.raises(TrainingError) as err:
        train(cfg, callbacks=[BreakFile(bins["good"], at=1)])
    final = out / "checkpoints" / "step_00000003.pt"
    assert str(err.value).startswith("final evaluation at step 3 failed (EvalDataError: ")
    assert str(err.value).endswith(f"; the checkpoint {final} is saved")
    assert err.value.exit_code == 1
    saved = checkpoint.load(final)
    assert saved["step"] == 3 and saved["metrics"]["eval_error"]["step"] == 3


def test_a_failed_periodic_evaluation_lets_training_go_on(synthetic_data, tmp_path, bins,
                                                          single_thread):
    out = tmp_path / "run"
    cfg = load_config(None, overrides(synthetic_data, out, "schedule.total_steps=4",
                                      "eval.every_steps=2", "checkpoint.every_steps=2",
                                      f"eval.bin_sets=[{bins['good']}]"))
    result = train(cfg, callbacks=[BreakFile(bins["good"], at=1, until=3)])
    assert result.status == "completed" and steps_in(out / "checkpoints") == [2, 4]
    assert checkpoint.load(out / "checkpoints" / "step_00000002.pt")["metrics"]["eval_error"][
        "step"] == 2
    assert result.metrics["eval"]["step"] == 4


# -- command lines and messages ---------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--ijb", "/data/IJBC"], "1 --ijb roots but 0 --ijb-name"),
    ([], "nothing to evaluate: give --bin FILE ..., --folder DIR ..., --ijb ROOT ... "
         "--ijb-name NAME ... and/or --tinyface DIR"),
])
def test_evaluation_usage_errors_exit_2(tmp_path, capsys, args, message):
    from fr_distill.commands.eval import eval_main

    with pytest.raises(SystemExit) as exit_:
        eval_main(["--model", str(tmp_path / "m.pt"), "--out", str(tmp_path / "out"), *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_evaluation_out_that_cannot_be_written_fails_before_the_model_loads(
        synthetic_data, tmp_path, capsys):
    from fr_distill.commands.eval import eval_main

    (tmp_path / "taken").write_text("a file")
    code = eval_main(["--model", str(tmp_path / "missing.pt"), "--bin",
                      str(synthetic_data / "synth_lfw.bin"), "--out", str(tmp_path / "taken")])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: --out: {tmp_path / 'taken'} is a file, not a directory"


def test_a_pickle_that_runs_code_is_refused_naming_the_global(tmp_path):
    from fr_distill.models.errors import ModelLoadError
    from fr_distill.models.weights import safe_torch_load

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "teacher.pth"
    torch.save({"weight": RunsCode()}, path)
    with pytest.raises(ModelLoadError) as err:
        safe_torch_load(str(path))
    assert str(err.value) == (f"refusing to unpickle code from {path}: it references "
                              f"{os.system.__module__}.system (save a state_dict instead)")


def test_an_onnx_file_given_to_export_is_not_called_code(tmp_path):
    from fr_distill.models.errors import ModelLoadError
    from fr_distill.models.export import load_student

    onnx = tmp_path / "backbone.onnx"
    onnx.write_bytes(b"\x08\x07\x12\x07pytorch\x1a\x052.1.0" + bytes(64))  # protobuf header
    with pytest.raises(ModelLoadError) as err:
        load_student(str(onnx))
    assert str(err.value) == (f"cannot read {onnx}: not a torch.save file (truncated, corrupt, "
                              f"or another format such as ONNX)")


def test_folder2rec_does_not_overwrite_a_data_set(jpeg_folder, tmp_path):
    from fr_distill.data import DataError
    from fr_distill.data.convert import folder_to_recordio

    rec = tmp_path / "train.rec"
    folder_to_recordio(jpeg_folder, rec, seed=0)
    before = rec.read_bytes()
    with pytest.raises(DataError) as err:
        folder_to_recordio(jpeg_folder, rec, seed=1)
    assert str(err.value) == (f"{rec}, {tmp_path / 'train.idx'}, {tmp_path / 'property'} "
                              f"already exist(s); remove them or pass --force to overwrite")
    assert rec.read_bytes() == before
    folder_to_recordio(jpeg_folder, rec, seed=1, overwrite=True)
    assert rec.read_bytes() != before
