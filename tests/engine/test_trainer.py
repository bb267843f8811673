"""The trainer in one process (no process group) on the synthetic face data: learning,
gradient accumulation, fallback from a truncated checkpoint, the non-finite-loss stop,
diagnostics and balanced runs."""
from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import assert_checkpoints_bitwise
from fr_distill.config import load_config
from fr_distill.checkpoint import files as checkpoint
from fr_distill.engine import NonFiniteLossError
from fr_distill.engine.trainer import train
from fr_distill.engine.callbacks import Callback
from fr_distill.eval import evaluate_bin_sets
from fr_distill.models import build_student


def _overrides(data: Path, out: Path, teacher: Path | None = None) -> list[str]:
    base = [f"data.train={data / 'train'}", "data.loader=torch", "data.num_workers=0",
            "model.width=0.125", "model.embedding_dim=32", "precision.amp=fp32",
            f"run.output_dir={out}", "logging.tensorboard=false", "logging.every_steps=1"]
    if teacher is None:
        return base + ["loss.iled.weight=0", "loss.rpsd.weight=0"]
    return base + [f"teacher.path={teacher}", "teacher.name=iresnet18", "teacher.width=0.125",
                   "teacher.embedding_dim=32"]


def _assert_identical(a, b, where: str = "") -> None:
    """Bitwise equality of nested dicts of tensors and plain values."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}.{key}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_short_run_raises_verification_accuracy(synthetic_data, tmp_path, single_thread):
    """60 steps of SphereFace2 training: verification on the synthetic .bin sets (identities
    disjoint from training) rises well above the same initialization's untrained values."""
    bins = [str(synthetic_data / "synth_lfw.bin"), str(synthetic_data / "synth_cfp.bin")]
    cfg = load_config(None, _overrides(synthetic_data, tmp_path / "run") + [
        "data.batch_size=16", "optim.lr=0.1", "schedule.total_steps=60",
        "schedule.warmup_steps=5", "schedule.milestones=[50]", "checkpoint.every_steps=60",
        "logging.every_steps=20", f"eval.bin_sets=[{','.join(bins)}]",
        "eval.best_metric=synth_lfw/auc"])
    torch.manual_seed(cfg.run.seed)  # the trainer's initialization of the student
    student = build_student(cfg.model.name, cfg.model.embedding_dim, cfg.model.width,
                            cfg.model.dropout)
    untrained = evaluate_bin_sets(student, bins, torch.device("cpu"))
    result = train(cfg)
    trained = result.metrics["eval"]
    assert trained["step"] == 60

    def mean(metric: str, results) -> float:
        return sum(results(name, metric) for name in ("synth_lfw", "synth_cfp")) / 2

    before = lambda name, metric: untrained[name][metric]  # noqa: E731
    after = lambda name, metric: trained[f"{name}/{metric}"]  # noqa: E731
    assert mean("auc", after) > mean("auc", before) + 0.1, (untrained, trained)
    assert mean("accuracy_mean", after) > mean("accuracy_mean", before) + 0.04, (untrained, trained)
    best = checkpoint.load(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["metrics"]["best"] == {"metric": "synth_lfw/auc", "value": trained["synth_lfw/auc"],
                                       "step": 60}


class PerturbStudent(Callback):
    """Multiplies every student weight by (1 ± ``relative``) with random signs at the start."""

    def __init__(self, relative: float) -> None:
        self.relative = relative

    def on_train_start(self, run) -> None:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in run.student.parameters():
                signs = torch.randint(0, 2, p.shape, generator=g).float() * 2 - 1
                p.mul_(1 + signs * self.relative)


def _relative_gap(a: dict, b: dict) -> float:
    """The largest difference between two state dicts, relative to each tensor's scale."""
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item()
               for k in b if b[k].is_floating_point())


def test_gradient_accumulation_equals_the_larger_batch(synthetic_data, tmp_path, single_thread):
    """batch 8 × 1 and batch 4 × 2 micro-steps: same schedule, same losses and weights up to
    the rounding of a different summation order.

    The two runs add the same terms in a different order: the convolution kernels the CPU
    library picks for a batch of 4 and of 8 reduce differently (on the Intel CPUs of our
    machines the first update differs by about one float32 ulp; on an AMD EPYC the losses of
    steps 3–4 differed by 1.3e-4 relative), and SGD amplifies such differences from step to
    step. So the tolerance is measured on the machine that runs the test, from that cause:
    the weight difference the first update leaves (``ε``, relative) is applied as a random
    perturbation to the start of a third run of batch 8, and the accumulated run may differ
    from the full one by at most 10× what that perturbation causes (it receives a rounding
    difference at every step, the perturbed run once), and never by more than 1e-3 relative."""
    common = ["model.freeze_bn=true", "schedule.total_steps=4", "schedule.warmup_steps=2",
              "schedule.name=cosine", "optim.reference_batch=16", "optim.grad_clip=5",
              "checkpoint.every_steps=1", "checkpoint.keep_last=4"]
    configs = {"full": ["data.batch_size=8"],
               "accumulated": ["data.batch_size=4", "optim.accumulation_steps=2"]}

    def run(name: str, extra: list[str], callbacks=()) -> tuple[dict, dict, list[dict]]:
        out = tmp_path / name
        result = train(load_config(None, _overrides(synthetic_data, out) + common + extra),
                       callbacks=callbacks)
        assert result.status == "completed" and result.step == 4
        store = checkpoint.CheckpointStore(out / "checkpoints", keep_last=4)
        return (checkpoint.load(store.step_path(1)), checkpoint.load(store.step_path(4)),
                _records(out))

    (full1, full, full_log), (acc1, acc, acc_log) = (run(k, v) for k, v in configs.items())
    assert [r["lr"] for r in acc_log] == pytest.approx([r["lr"] for r in full_log])
    assert full_log[0]["lr"] == pytest.approx(0.1 * 8 / 16 / 2)  # scaled, first warmup step
    assert acc["data"]["position"] == 8 and full["data"]["position"] == 4
    epsilon = max(_relative_gap(acc1["student"], full1["student"]), 2.0 ** -24)
    assert epsilon < 1e-4, epsilon  # one update: rounding only
    _, perturbed, pert_log = run("perturbed", configs["full"], [PerturbStudent(epsilon)])
    for step, (a, f, p) in enumerate(zip(acc_log, full_log, pert_log), start=1):
        bound = max(10 * abs(p["sphereface2"] - f["sphereface2"]),
                    1e-6 * abs(f["sphereface2"]))
        assert abs(a["sphereface2"] - f["sphereface2"]) <= min(bound, 1e-3 * f["sphereface2"]), \
            (step, epsilon, a, f, p)
    drift = _relative_gap(perturbed["student"], full["student"])
    assert _relative_gap(acc["student"], full["student"]) <= min(max(10 * drift, 1e-6), 1e-3)


def test_truncated_newest_checkpoint_falls_back_and_resumes_exactly(
        synthetic_data, teacher_file, tmp_path, single_thread):
    out = tmp_path / "run"
    cfg = load_config(None, _overrides(synthetic_data, out, teacher_file) + [
        "data.batch_size=8", "schedule.total_steps=4", "checkpoint.every_steps=2"])
    assert train(cfg).start_step == 0
    store = checkpoint.CheckpointStore(out / "checkpoints", keep_last=3)
    newest = store.step_path(4)
    uninterrupted = checkpoint.load(newest)
    newest.write_bytes(newest.read_bytes()[:4096])  # e.g. the disk filled up mid-write
    assert store.latest_valid() == store.step_path(2)
    result = train(cfg)
    assert (result.start_step, result.step, result.status) == (2, 4, "completed")
    again = checkpoint.load(newest)
    _assert_identical(uninterrupted["student"], again["student"])
    _assert_identical(uninterrupted["objective"], again["objective"])


def test_two_sets_resume_mid_epoch_exactly(synthetic_data, teacher_file, tmp_path, single_thread):
    """data.train = [the folder, the RecordIO pair] of the synthetic set: 2 × 24 identities
    (the head has 48 rows), 48 steps per epoch; resuming at step 2 ends bitwise equal."""
    out = tmp_path / "run"
    sets = f"data.train=[{synthetic_data / 'train'}, {synthetic_data / 'train.rec'}]"
    cfg = load_config(None, _overrides(synthetic_data, out, teacher_file) + [
        sets, "data.batch_size=8", "schedule.total_steps=4", "checkpoint.every_steps=2"])
    assert train(cfg).start_step == 0
    store = checkpoint.CheckpointStore(out / "checkpoints", keep_last=3)
    uninterrupted = checkpoint.load(store.step_path(4))
    assert uninterrupted["objective"]["head.weight"].shape[0] == 48
    assert uninterrupted["data"]["format"] == "folder+recordio"
    for suffix in ("", ".sha256"):
        Path(f"{store.step_path(4)}{suffix}").unlink()
    result = train(cfg)
    assert (result.start_step, result.step, result.status) == (2, 4, "completed")
    assert_checkpoints_bitwise(uninterrupted, checkpoint.load(store.step_path(4)))


def test_bad_sharded_checkpoints_fall_back_naming_the_file_and_resume_exactly(
        synthetic_data, teacher_file, tmp_path, single_thread):
    """checkpoint.format=dcp: the newest directory has a truncated rank file, the next one
    lacks a rank file, the next its commit marker, and an interrupted save left a temporary
    directory; the run falls back to step 2 (one warning per directory, naming the file)
    and ends bitwise equal to the uninterrupted run. A head of another size (two training
    sets: 48 identities) is refused."""
    out = tmp_path / "run"
    cfg = load_config(None, _overrides(synthetic_data, out, teacher_file) + [
        "data.batch_size=8", "schedule.total_steps=8", "checkpoint.every_steps=2",
        "checkpoint.keep_last=4", "checkpoint.format=dcp"])
    train(cfg)
    store = checkpoint.CheckpointStore(out / "checkpoints", keep_last=4, sharded=True)
    assert store.steps() == [8, 6, 4, 2] and store.step_path(8).is_dir()
    uninterrupted = checkpoint.load(store.step_path(8))
    rank_file = store.step_path(8) / "__0_0.distcp"
    rank_file.write_bytes(rank_file.read_bytes()[:4096])
    (store.step_path(6) / "__0_0.distcp").unlink()
    (store.step_path(4) / "SHA256SUMS").unlink()
    (out / "checkpoints" / ".step_00000010.tmp").mkdir()
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger(checkpoint.__name__).addHandler(handler)  # fr_distill does not propagate
    try:
        assert store.latest_valid() == store.step_path(2)
    finally:
        logging.getLogger(checkpoint.__name__).removeHandler(handler)
    assert warnings == [
        f"checkpoint {store.step_path(8)} is unusable (__0_0.distcp: sha256 mismatch (truncated "
        f"or corrupt; 4096 bytes)); trying the previous one",
        f"checkpoint {store.step_path(6)} is unusable (__0_0.distcp missing); trying the "
        f"previous one",
        f"checkpoint {store.step_path(4)} is unusable (commit marker SHA256SUMS missing (write "
        f"interrupted?)); trying the previous one"]
    result = train(cfg)
    assert (result.start_step, result.step, result.status) == (2, 8, "completed")
    again = checkpoint.load(store.step_path(8))
    for part in ("student", "objective", "optimizer"):
        _assert_identical(uninterrupted[part], again[part], part)
    other_head = load_config(None, _overrides(synthetic_data, out, teacher_file) + [
        f"data.train=[{synthetic_data / 'train'}, {synthetic_data / 'train.rec'}]",
        "data.batch_size=8", "schedule.total_steps=10", "checkpoint.format=dcp"])
    with pytest.raises(checkpoint.CheckpointError) as err:
        train(other_head)
    assert str(err.value) == (
        f"{store.step_path(8)} does not fit this run: 'objective/head.weight' is [24, 32] in "
        f"the checkpoint, [48, 32] in this run; resume with the settings it was written with, "
        f"or start afresh (checkpoint.resume=false)")
    assert err.value.exit_code == 2


class _SigtermAfter(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, run, stats) -> None:
        if run.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_commits_the_background_checkpoint_before_stopping(
        synthetic_data, tmp_path, single_thread):
    """checkpoint.async_save: SIGTERM after step 1; step 2's checkpoint, written in the
    background, is committed before the run stops for requeueing, and the next run resumes
    from it."""
    out = tmp_path / "run"
    cfg = load_config(None, _overrides(synthetic_data, out) + [
        "data.batch_size=8", "schedule.total_steps=4", "checkpoint.every_steps=4",
        "checkpoint.format=dcp", "checkpoint.async_save=true"])
    result = train(cfg, [_SigtermAfter(1)])
    assert (result.status, result.step) == ("preempted", 2)
    assert json.loads((out / "REQUEUE").read_text()) == {"step": 2}
    store = checkpoint.CheckpointStore(out / "checkpoints", keep_last=3, sharded=True)
    assert store.latest_valid() == out / "checkpoints" / "step_00000002"
    assert not list((out / "checkpoints").glob(".*.tmp"))
    result = train(cfg)
    assert (result.status, result.start_step, result.step) == ("completed", 2, 4)


def test_nonfinite_loss_skips_steps_then_stops_with_one_line(synthetic_data, teacher_file,
                                                            tmp_path, single_thread):
    """A learning rate of 1e30 blows the weights up after the first step; the following
    steps are skipped and counted, and the run stops after max_nonfinite_steps in a row,
    leaving the last checkpoint valid."""
    out = tmp_path / "run"
    cfg = load_config(None, _overrides(synthetic_data, out, teacher_file) + [
        "data.batch_size=8", "optim.lr=1.0e+30", "schedule.total_steps=10",
        "checkpoint.every_steps=1", "run.max_nonfinite_steps=2"])
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("non-finite loss at step 3 (2 steps in a row, limit "
                              "run.max_nonfinite_steps=2); non-finite terms: student embeddings")
    store = checkpoint.CheckpointStore(out / "checkpoints", keep_last=3)
    last = checkpoint.load(store.latest_valid())
    assert last["step"] == 2 and last["faults"] == {"total": 1, "in_a_row": 1}
    skipped = [r for r in _records(out) if r.get("skipped_steps")]
    assert [r["step"] for r in skipped] == [2]


def test_diagnostics_are_logged_on_logging_steps_and_leave_training_unchanged(
        synthetic_data, teacher_file, tmp_path, single_thread):
    """METHOD (D1) in the trainer: per-term records every ``logging.every_steps`` (and at the
    last step), and a run with them ends bitwise equal to the same run without them."""
    states = {}
    # "off": balancing targets set while loss.balance.enabled is false (METHOD E7) change nothing
    for variant in ("on", "none", "off"):
        diagnostics = variant != "none"
        out = tmp_path / f"diagnostics_{variant}"
        balance = ["loss.balance.iled=0.5", "loss.balance.rpsd=1", "loss.balance.fc=0.5"]
        cfg = load_config(None, _overrides(synthetic_data, out, teacher_file) + [
            "data.batch_size=8", "schedule.total_steps=5", "checkpoint.every_steps=5",
            "logging.every_steps=2", f"logging.diagnostics={str(diagnostics).lower()}",
            "loss.fc.weight=1.0"] + (balance if variant == "off" else []))
        train(cfg)
        states[variant] = checkpoint.load(out / "checkpoints" / "step_00000005.pt")
        records = _records(out)
        assert [r["step"] for r in records] == [2, 4, 5]
        with_grad = [r for r in records if "grad_norm/iled" in r]
        assert len(with_grad) == (3 if diagnostics else 0)
        assert not any(key.startswith("balance/") for r in records for key in r)
    for record in with_grad:
        terms = ("sphereface2", "iled", "rpsd", "fc")
        assert sum(record[f"grad_share/{t}"] for t in terms) == pytest.approx(1.0, abs=1e-5)
        assert sum(record[f"loss_share/{t}"] for t in terms) == pytest.approx(1.0, abs=1e-5)
        assert all(record[f"grad_norm/{t}"] > 0 for t in ("sphereface2", "iled", "fc"))
        assert 0.0 <= record["iled/below_target"] <= 1.0
        assert 0.0 <= record["rpsd/above_tolerance"] <= 1.0 and record["rpsd/mean_gap"] > 0
    for variant in ("none", "off"):
        _assert_identical(states["on"]["student"], states[variant]["student"], "student")
        _assert_identical(states["on"]["objective"], states[variant]["objective"], "objective")


def _balanced_ema(synthetic_data: Path, out: Path, teacher_file: Path) -> list[str]:
    return _overrides(synthetic_data, out, teacher_file) + [
        "data.batch_size=8", "schedule.total_steps=4", "checkpoint.every_steps=2",
        "checkpoint.keep_last=3", "logging.every_steps=1", "loss.iled.weight=1",
        "loss.balance.enabled=true",
        "loss.balance.iled=0.5", "loss.balance.rpsd=1.0", "loss.balance.smoothing=0.5",
        "loss.rpsd.student_anchor=ema_student_bank", "loss.rpsd.ema_momentum=0.5"]


def test_balanced_run_with_an_ema_student_bank_resumes_bitwise(synthetic_data, teacher_file,
                                                                 tmp_path, single_thread):
    """METHOD (E7) and the EMA student of (E4) in the trainer: the weights move on every
    logging step and are logged; the balanced weights and the EMA student are checkpoint
    state, so a run resumed at step 2 ends bitwise equal to the uninterrupted one."""
    out = tmp_path / "run"
    cfg = load_config(None, _balanced_ema(synthetic_data, out, teacher_file))
    train(cfg)
    store = checkpoint.CheckpointStore(out / "checkpoints", keep_last=3)
    uninterrupted = checkpoint.load(store.step_path(4))
    records = _records(out)
    iled = [r["balance/iled"] for r in records]
    rpsd = [r["balance/rpsd"] for r in records]
    assert len(set(iled)) == 4 and iled[0] != 1.0 and rpsd[0] == 40.0 and rpsd[-1] != 40.0
    assert all(r["balance/held"] == 0.0 for r in records)
    assert float(uninterrupted["objective"]["balancer.weights"][0]) == pytest.approx(iled[-1])
    assert any(k.startswith("ema_student.encoder.") for k in uninterrupted["objective"])
    for suffix in ("", ".sha256"):
        Path(f"{store.step_path(4)}{suffix}").unlink()
    result = train(cfg)
    assert (result.start_step, result.step) == (2, 4)
    assert_checkpoints_bitwise(uninterrupted, checkpoint.load(store.step_path(4)))


def test_balanced_weights_are_kept_when_the_face_recognition_gradient_is_unusable(
        synthetic_data, teacher_file, tmp_path, single_thread, monkeypatch, caplog):
    """A zero (or non-finite) SphereFace2 gradient leaves λ undefined (E7): every weight keeps
    its value, and the log says so once."""
    import fr_distill.losses.objective as objective_module

    measured = objective_module.term_diagnostics

    def zero_face_recognition_gradient(*args):
        out = measured(*args)
        return {**out, "grad_norm/sphereface2": out["grad_norm/sphereface2"] * 0.0}

    monkeypatch.setattr(objective_module, "term_diagnostics", zero_face_recognition_gradient)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        train(load_config(None, _balanced_ema(synthetic_data, out, teacher_file)))
    records = _records(out)
    assert [r["balance/iled"] for r in records] == [1.0] * 4
    assert [r["balance/rpsd"] for r in records] == [40.0] * 4
    assert all(r["balance/held"] == 1.0 for r in records)
    said = [r.message for r in caplog.records if "balanced weights keep" in r.message]
    assert len(said) == 1 and said[0].startswith("step 1: the face-recognition gradient")
