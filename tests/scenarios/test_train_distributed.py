"""The trainer under torchrun (gloo, CPU), sharing one uninterrupted 2-rank reference run:

* 2 ranks × batch B equal 1 rank × batch 2B (losses and weights within 1e-5);
* a worker SIGKILLed at a random step with ``--max-restarts 1``: the run completes with final
  weights bitwise equal to the reference; on the DALI loader, rank 0 (the lock holder)
  SIGKILLed: the restarted group takes the lock and completes, and no process is left;
* SIGTERM on one rank: every rank stops after the same step, a checkpoint and the requeue
  marker appear, workers exit with REQUEUE_EXIT_CODE, and resuming ends bitwise equal;
* resume on a different world size keeps the global batch (class-sharded head re-sharded);
* the teacher is bitwise unchanged after training;
* a teacher-embedding cache built on 2 ranks holds the bytes of one built on 1 rank, and
  training from it ends bitwise equal to the reference (the teacher on the fly).

The student is an IResNet-18 of width 1/8 with ``model.freeze_bn`` (BatchNorm on its running
statistics), so it has no batch statistics: with them, ranks normalizing their half batch
would legitimately differ from one rank normalizing the whole batch. The SphereFace2 head is
class-sharded, so its gathering, re-sharding and per-rank momentum are exercised too.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from conftest import (REPO, TAG_VARIABLE, assert_checkpoints_bitwise, lock_is_free, run_torchrun,
                      tagged_processes, wait_until)
from fr_distill.config import load_config
from fr_distill.checkpoint import files as checkpoint
from fr_distill.engine import REQUEUE_EXIT_CODE, REQUEUE_MARKER
from fr_distill.models import get_backbone
from fr_distill.models.export import load_student

pytestmark = pytest.mark.dist  # every test reads runs launched under torchrun

WORKER = REPO / "tests" / "workers" / "worker_train_run.py"
STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory, synthetic_data) -> dict:
    root = tmp_path_factory.mktemp("train_dist")
    torch.manual_seed(123)
    teacher_file = root / "teacher.pth"
    torch.save(get_backbone("iresnet18", 32, width=0.125).state_dict(), teacher_file)
    overrides = [
        f"data.train={synthetic_data / 'train'}", "data.loader=torch", "data.num_workers=0",
        "data.batch_size=4", "model.name=iresnet18", "model.width=0.125",
        "model.embedding_dim=32", "model.freeze_bn=true", f"teacher.path={teacher_file}",
        "teacher.name=iresnet18", "teacher.width=0.125", "teacher.embedding_dim=32",
        "loss.sphereface2.parallel=class_sharded", "precision.amp=fp32", "optim.lr=0.01",
        "optim.no_decay_bn_bias=true", f"schedule.total_steps={STEPS}", "schedule.warmup_steps=1",
        "schedule.milestones=[6]", "checkpoint.every_steps=2", "checkpoint.keep_last=10",
        "logging.every_steps=1", "logging.tensorboard=false", "run.seed=5",
        f"eval.bin_sets=[{synthetic_data / 'synth_lfw.bin'}]", "eval.best_metric=synth_lfw/auc"]
    return {"root": root, "teacher": teacher_file, "overrides": overrides}


def _run(setup, name: str, *extra: str, torchrun_args=(), check=True, worker_args=(),
         env=None):
    out = setup["root"] / name
    proc = run_torchrun(WORKER, *worker_args, "--teacher-file", str(setup["teacher"]),
                        *setup["overrides"], f"run.output_dir={out}", *extra, nproc=2,
                        torchrun_args=torchrun_args, check=check, timeout=300, env=env)
    return out, proc


def _final(run_dir: Path, step: int = STEPS) -> dict:
    """The checkpoint of ``step``: a file, or with checkpoint.format=dcp a directory."""
    return checkpoint.load(run_dir / "checkpoints" / f"step_{step:08d}.pt")


def _losses(run_dir: Path) -> dict[int, dict]:
    """Last logged record of each step (a restarted run logs resumed steps again)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "total" in r}


@pytest.fixture(scope="module")
def reference(setup) -> Path:
    out, _ = _run(setup, "reference", "logging.tensorboard=true")
    return out


def test_reference_run_records_and_teacher_unchanged(reference):
    result = json.loads((reference / "result.json").read_text())
    assert result == {"status": "completed", "step": STEPS, "start_step": 0,
                      "teacher_unchanged": True}
    info = json.loads((reference / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["global_batch"] == 8 and "torch" in info["versions"]
    assert load_config(reference / "config.yaml").loss.sphereface2.parallel == "class_sharded"
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    losses = _losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert {"sphereface2", "iled", "rpsd", "total", "cosine", "lr", "images_per_s",
            "data_wait_share"} <= losses[1].keys()
    assert losses[1]["lr"] == pytest.approx(0.01) and losses[7]["lr"] == pytest.approx(0.001)
    assert losses[1]["rpsd"] == 0.0 and losses[2]["rpsd"] > 0.0  # bank empty at step 1 only
    assert sorted(p.name for p in (reference / "checkpoints").glob("step_*.pt")) == [
        f"step_{s:08d}.pt" for s in (2, 4, 6, 8)]
    evals = [r for r in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines())
             if "eval" in r]  # evaluated once, at the end, with the images sharded over 2 ranks
    assert [r["step"] for r in evals] == [STEPS]
    assert 0.0 < evals[0]["eval"]["synth_lfw/auc"] <= 1.0
    best = checkpoint.load(reference / "checkpoints" / "best.pt")
    assert best["metrics"]["best"]["value"] == evals[0]["eval"]["synth_lfw/auc"]


def test_two_ranks_equal_one_rank_with_double_batch(setup, reference, single_thread):
    from fr_distill.engine.trainer import train

    out = setup["root"] / "one_rank"
    cfg = load_config(None, setup["overrides"] + ["data.batch_size=8", f"run.output_dir={out}"])
    train(cfg)
    two, one = _losses(reference), _losses(out)
    for step in range(1, STEPS + 1):
        for term in ("sphereface2", "iled", "rpsd", "total"):
            assert one[step][term] == pytest.approx(two[step][term], rel=1e-5, abs=1e-6), (step, term)
    a, b = _final(reference), _final(out)
    for key, value in a["student"].items():
        torch.testing.assert_close(b["student"][key], value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b["objective"]["head.weight"], a["objective"]["head.weight"],
                               rtol=1e-5, atol=1e-5)


def _copy_checkpoint(source: Path, out: Path) -> None:
    """A checkpoint file (with its sidecar) or directory into ``out``'s checkpoints."""
    (out / "checkpoints").mkdir(parents=True)
    if source.is_dir():
        shutil.copytree(source, out / "checkpoints" / source.name)
    else:
        for suffix in ("", ".sha256"):
            shutil.copy(f"{source}{suffix}", out / "checkpoints")


def _resume_in_process(setup, name: str, source: Path, *extra: str):
    """Train on 1 rank (in this process) from a copy of the checkpoint ``source``."""
    from fr_distill.engine.trainer import train

    out = setup["root"] / name
    _copy_checkpoint(source, out)
    cfg = load_config(None, setup["overrides"] + [f"run.output_dir={out}", *extra])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1)
    try:
        return out, train(cfg)  # batch_size=4 on W=1: the checkpoint's global batch 8 kept
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def resized(setup, reference) -> Path:
    """The reference's step-4 checkpoint resumed on 1 rank (file format)."""
    out, result = _resume_in_process(setup, "resize",
                                     reference / "checkpoints" / "step_00000004.pt")
    assert (result.start_step, result.step) == (4, STEPS)
    return out


def test_resume_on_other_world_size_keeps_global_batch(reference, resized):
    out = resized
    info = json.loads((out / "run_info.json").read_text())
    assert info["batch_per_rank"] == 8 and info["global_batch"] == 8
    a, b = _final(reference), _final(out)
    for key, value in a["student"].items():
        torch.testing.assert_close(b["student"][key], value, rtol=1e-5, atol=1e-5)
    assert b["optimizer"]["state"].keys() == a["optimizer"]["state"].keys()


def test_killed_worker_restarts_and_ends_bitwise_equal(setup, reference):
    step = random.randint(1, STEPS - 1)
    print(f"SIGKILL to rank 1 after step {step}")  # shown with a failure
    out = setup["root"] / "killed"
    out.mkdir()
    _run(setup, "killed", torchrun_args=("--max-restarts", "1"),
                   worker_args=("--fault", "kill", "--fault-step", str(step), "--fault-rank", "1",
                                "--marker", str(out / "killed_once")))
    assert (out / "killed_once").read_text() == str(step)
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "completed" and result["start_step"] == step - step % 2, step
    assert_checkpoints_bitwise(_final(reference), _final(out))


def test_killed_lock_holder_on_the_dali_loader_restarts_and_leaves_no_process(setup,
                                                                             process_tag):
    """The DALI loader (one Python worker per rank): rank 0, which holds the run's lock,
    SIGKILLed after step 3. The restarted group takes the lock, resumes from step 2 and
    completes (before, the killed rank's orphaned workers kept the lock and both restarted
    ranks failed 'in use by another run'), and no process of the run is left."""
    out = setup["root"] / "killed_dali"
    out.mkdir()
    _run(setup, "killed_dali", "data.loader=dali", "data.num_workers=1",
         "schedule.total_steps=4", "eval.bin_sets=[]", "eval.best_metric=",
         torchrun_args=("--max-restarts", "1"), env={TAG_VARIABLE: process_tag},
         worker_args=("--fault", "kill", "--fault-step", "3", "--fault-rank", "0",
                      "--marker", str(out / "killed_once")))
    assert (out / "killed_once").read_text() == "3"
    result = json.loads((out / "result.json").read_text())
    assert (result["status"], result["start_step"], result["step"]) == ("completed", 2, 4)
    assert wait_until(lambda: not tagged_processes(process_tag)), tagged_processes(process_tag)
    assert lock_is_free(out)


def test_worker_killed_during_evaluation_loses_nothing_saved(setup, reference):
    """Rank 1 dies as the periodic evaluation of step 4 begins, rank 0 waiting inside it: the
    step-4 checkpoint (written after the evaluation) never appears, the group restarts from
    step 2 and ends bitwise equal to the run without evaluations or faults."""
    out = setup["root"] / "killed_in_eval"
    out.mkdir()
    _run(setup, "killed_in_eval", "eval.every_steps=2", torchrun_args=("--max-restarts", "1"),
         worker_args=("--fault", "kill-eval", "--fault-step", "4", "--fault-rank", "1",
                      "--marker", str(out / "killed_once")))
    assert (out / "killed_once").read_text() == "4"
    result = json.loads((out / "result.json").read_text())
    assert (result["status"], result["start_step"]) == ("completed", 2)
    evals = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "eval" in r]
    assert evals == [2, 4, 6, 8]  # step 4's interrupted evaluation was done after the restart
    assert_checkpoints_bitwise(_final(reference), _final(out))


def test_sigterm_checkpoints_requeues_and_resumes_exactly(setup, reference):
    step = random.randint(1, STEPS - 2)
    print(f"SIGTERM to rank 1 after step {step}")  # shown with a failure
    out = setup["root"] / "preempted"
    out.mkdir()
    _, proc = _run(setup, "preempted", check=False,
                   worker_args=("--fault", "term", "--fault-step", str(step), "--fault-rank", "1",
                                "--marker", str(out / "signalled")))
    assert proc.returncode != 0
    assert f"exitcode  : {REQUEUE_EXIT_CODE}" in proc.stderr + proc.stdout, proc.stderr[-3000:]
    stopped = step + 1  # the signal reaches the ranks' agreement in the following step
    assert json.loads((out / REQUEUE_MARKER).read_text()) == {"step": stopped}
    assert json.loads((out / "result.json").read_text())["status"] == "preempted"
    assert checkpoint.load(out / "checkpoints" / f"step_{stopped:08d}.pt")["step"] == stopped
    _run(setup, "preempted")
    result = json.loads((out / "result.json").read_text())
    assert (result["status"], result["start_step"]) == ("completed", stopped)
    assert not (out / REQUEUE_MARKER).exists()
    assert_checkpoints_bitwise(_final(reference), _final(out))


def test_training_from_a_teacher_cache_equals_the_teacher_on_the_fly(setup, reference, tmp_path):
    """``fr-distill cache-teacher`` under torchrun on 2 ranks (float32 rows, per-rank batch 4
    as the reference's) writes the bytes a 1-rank build writes; the 2-rank run reading it
    ends bitwise equal to the reference run, which ran the teacher every step."""
    cache = setup["root"] / "teacher_cache"
    config = tmp_path / "base.yaml"
    config.write_text("{}\n")
    build = ("cache-teacher", "--config", str(config), "--shard-samples", "64",
             *setup["overrides"], f"teacher.cache={cache}", "teacher.cache_dtype=float32")
    run_torchrun("fr_distill.cli", *build, nproc=2, torchrun_args=("-m",), timeout=300)
    one_rank = tmp_path / "one_rank"
    run_torchrun("fr_distill.cli", *build[:-2], f"teacher.cache={one_rank}",
                 "teacher.cache_dtype=float32", nproc=1, torchrun_args=("-m",), timeout=300)
    assert (cache / "embeddings.bin").read_bytes() == (one_rank / "embeddings.bin").read_bytes()
    cached, _ = _run(setup, "cached", f"teacher.cache={cache}", "teacher.cache_dtype=float32")
    assert_checkpoints_bitwise(_final(reference), _final(cached))


# -- sharded checkpoints (checkpoint.format=dcp) ---------------------------------------------
@pytest.fixture(scope="module")
def sharded(setup) -> Path:
    """The reference run with sharded checkpoints written in the background, rank 1 SIGKILLed
    after a random step and the group restarted from the newest committed directory (a
    checkpoint is committed at the next one: the one in flight at the kill is not used);
    keeps the last 3."""
    step = random.randint(1, STEPS - 1)
    print(f"SIGKILL to rank 1 after step {step}")  # shown with a failure
    out = setup["root"] / "sharded"
    out.mkdir()
    _run(setup, "sharded", "checkpoint.format=dcp", "checkpoint.async_save=true",
         "checkpoint.keep_last=3", torchrun_args=("--max-restarts", "1"),
         worker_args=("--fault", "kill", "--fault-step", str(step), "--fault-rank", "1",
                      "--marker", str(out / "killed_once")))
    committed = max(step - step % 2 - 2, 0)
    assert json.loads((out / "result.json").read_text())["start_step"] == committed, step
    return out


def test_sharded_checkpoints_equal_the_single_file_ones_bitwise(reference, sharded):
    """Each rank wrote its own rows; after a SIGKILL and a restart from the directory the
    run ends bitwise equal to the uninterrupted single-file run; keep-last 3; best.pt is the
    student alone, one file."""
    checkpoints = sharded / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "best.pt", "best.pt.sha256", "step_00000004", "step_00000006", "step_00000008"]
    assert sorted(p.name for p in (checkpoints / "step_00000008").iterdir()) == [
        ".metadata", "SHA256SUMS", "__0_0.distcp", "__1_0.distcp", "state.pt"]
    for step in (4, STEPS):
        ours = checkpoint.load(checkpoints / f"step_{step:08d}")
        assert ours["step"] == step
        assert_checkpoints_bitwise(_final(reference, step), ours)
    best = checkpoint.load(checkpoints / "best.pt")
    assert set(best) == {"format", "version", "step", "config", "student", "metrics"}
    assert all(torch.equal(v, ours["student"][k]) for k, v in best["student"].items())
    # export, evaluation, teacher.path and model.init read a directory as they read a file
    exported, _, exported_step = load_student(str(checkpoints / "step_00000008"))
    assert exported_step == STEPS
    assert all(torch.equal(v, ours["student"][k]) for k, v in exported.state_dict().items())


@pytest.fixture(scope="module")
def sharded_resized(setup, sharded) -> Path:
    """The sharded step-4 checkpoint of 2 ranks resumed on 1 rank, writing directories."""
    out, result = _resume_in_process(setup, "sharded_resize",
                                     sharded / "checkpoints" / "step_00000004",
                                     "checkpoint.format=dcp")
    assert (result.start_step, result.step) == (4, STEPS)
    return out


def test_sharded_checkpoint_resumes_from_two_ranks_on_one_bitwise(resized, sharded_resized):
    """2 → 1 ranks: the head rows of both ranks are read into one; the run ends bitwise equal
    to resuming the single-file checkpoint of the same step on 1 rank."""
    for step in (6, STEPS):
        assert_checkpoints_bitwise(_final(resized, step),
                                   checkpoint.load(sharded_resized / "checkpoints" /
                                                   f"step_{step:08d}"))


def test_sharded_checkpoint_resumes_from_one_rank_on_two_bitwise(setup, resized, sharded_resized):
    """1 → 2 ranks: each rank reads its half of the head written by one rank; the run ends
    bitwise equal to resuming the single-file checkpoint of that step on 2 ranks (which, with
    checkpoint.format=dcp, also shows an old single-file checkpoint resuming a sharded run)."""
    finals = []
    for name, source in (("from_file", resized / "checkpoints" / "step_00000006.pt"),
                         ("from_dir", sharded_resized / "checkpoints" / "step_00000006")):
        out = setup["root"] / f"grow_{name}"
        _copy_checkpoint(source, out)
        _run(setup, f"grow_{name}", "checkpoint.format=dcp")
        assert json.loads((out / "result.json").read_text())["start_step"] == 6
        finals.append(checkpoint.load(out / "checkpoints" / f"step_{STEPS:08d}"))
    assert_checkpoints_bitwise(*finals)
