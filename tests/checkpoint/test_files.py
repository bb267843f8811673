"""Unit tests of the engine's parts that need no model: checkpoints, schedules, optimizer,
signals and the non-finite guard."""
from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import signal

import numpy as np
import pytest
import torch

from fr_distill.config import OptimConfig, ScheduleConfig
from fr_distill.checkpoint import files as ckpt
from fr_distill.engine.faults import NonFiniteGuard, NonFiniteLossError, StopSignal
from fr_distill.engine.optim import build_optimizer, clip_gradients, param_groups, scaled_lr
from fr_distill.engine.schedule import build_scheduler, lr_factor


def _payload(step: int) -> dict:
    return {"format": "fr_distill", "version": 1, "step": step,
            "student": {"w": torch.full((4, 4), float(step))}, "rng": (1, (2, 3), None)}


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_and_sidecar(tmp_path):
    path = tmp_path / "c" / "step_00000003.pt"
    ckpt.save(_payload(3), path)
    sidecar = path.with_name(path.name + ".sha256").read_text().split()
    assert sidecar == [hashlib.sha256(path.read_bytes()).hexdigest(), path.name]
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["student"]["w"], torch.full((4, 4), 3.0))
    assert ckpt.load(path)["step"] == 3
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_keep_last_prunes_oldest(tmp_path):
    store = ckpt.CheckpointStore(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40):
        store.save_step(_payload(step), step)
    assert store.steps() == [40, 30]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000030.pt", "step_00000030.pt.sha256", "step_00000040.pt",
        "step_00000040.pt.sha256"]


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "no_sidecar"])
def test_damaged_newest_falls_back_to_previous(tmp_path, caplog, damage):
    store = ckpt.CheckpointStore(tmp_path, keep_last=3)
    for step in (1, 2):
        store.save_step(_payload(step), step)
    newest = store.step_path(2)
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    elif damage == "flip_byte":
        data = bytearray(newest.read_bytes())
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(bytes(data))
    else:
        newest.with_name(newest.name + ".sha256").unlink()
    with caplog.at_level(logging.WARNING):
        assert store.latest_valid() == store.step_path(1)
    assert "step_00000002.pt is unusable" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match="step_00000002.pt"):
        ckpt.load(newest)
    assert ckpt.load(store.latest_valid())["step"] == 1


def test_crash_while_writing_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    store = ckpt.CheckpointStore(tmp_path, keep_last=1)
    store.save_step(_payload(5), 5)
    good = store.step_path(5).read_bytes()
    real_fsync = os.fsync

    def failing_fsync(fd):  # the disk fails while the new file's data is being flushed
        raise OSError("injected I/O error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(ckpt.CheckpointError, match="injected"):
        store.save_step(_payload(6), 6)      # a new step
    with pytest.raises(ckpt.CheckpointError, match="injected"):
        store.save_step(_payload(99), 5)     # the same step rewritten
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert store.step_path(5).read_bytes() == good
    assert store.latest_valid() == store.step_path(5)
    assert not store.step_path(6).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_crash_between_file_and_checksum_is_not_trusted(tmp_path, monkeypatch):
    store = ckpt.CheckpointStore(tmp_path, keep_last=3)
    store.save_step(_payload(1), 1)
    real = ckpt.atomic_write

    def data_only(path, data, mode):
        if str(path).endswith(".sha256"):
            raise KeyboardInterrupt  # killed right after the data file was renamed
        real(path, data, mode)

    monkeypatch.setattr(ckpt, "atomic_write", data_only)
    with pytest.raises(KeyboardInterrupt):
        store.save_step(_payload(2), 2)
    assert store.step_path(2).exists()
    assert store.latest_valid() == store.step_path(1)


def test_not_a_checkpoint_is_one_line_error(tmp_path):
    path = tmp_path / "x.pt"
    ckpt.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ckpt.CheckpointError, match="not an fr_distill checkpoint"):
        ckpt.load(path)


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = ckpt.rng_state(torch.device("cpu"))
    expected = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random())
    ckpt.save({"format": "fr_distill", "rng": state}, tmp_path / "r.pt")
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ckpt.set_rng_state(ckpt.load(tmp_path / "r.pt")["rng"], torch.device("cpu"))
    again = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


# ---------------------------------------------------------------------------- schedules
def _lrs(cfg: ScheduleConfig, base: float = 0.1) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = build_scheduler(opt, cfg, base)
    out = []
    for _ in range(cfg.total_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_multistep_with_warmup():
    cfg = ScheduleConfig(name="multistep", total_steps=10, warmup_steps=2, milestones=[4, 7],
                         gamma=0.1)
    expected = [0.05, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001, 0.001]
    assert _lrs(cfg) == pytest.approx(expected, rel=1e-12)


def test_paper_multistep_boundaries():
    f = lr_factor(ScheduleConfig(), 0.1)
    assert [f(s) for s in (0, 39999, 40000, 59999, 60000, 70000, 79999)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.001, 0.001])


def test_cosine_and_poly():
    cos = ScheduleConfig(name="cosine", total_steps=11, warmup_steps=1, min_lr=0.01)
    lrs = _lrs(cos)
    assert lrs[0] == pytest.approx(0.1)  # warmup: (0+1)/1
    for s in range(1, 11):
        p = (s - 1) / 10
        assert lrs[s] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * p)))
    poly = ScheduleConfig(name="poly", total_steps=5, warmup_steps=0, power=2.0)
    assert _lrs(poly) == pytest.approx([0.1 * (1 - s / 5) ** 2 for s in range(5)])


def test_scheduler_resume_continues_exactly():
    cfg = ScheduleConfig(name="cosine", total_steps=20, warmup_steps=3)
    full = _lrs(cfg)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler(opt, cfg, 0.1)
    for _ in range(7):
        opt.step(), sched.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched2 = build_scheduler(opt2, cfg, 0.1)  # built first, as the trainer does, then loaded
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    resumed = []
    for _ in range(7, 20):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step(), sched2.step()
    assert resumed == full[7:]


# ---------------------------------------------------------------------------- optimizer
def test_lr_scaling_and_no_decay_groups():
    assert scaled_lr(OptimConfig(lr=0.1, reference_batch=512), 128) == pytest.approx(0.025)
    assert scaled_lr(OptimConfig(lr=0.1, reference_batch=0), 128) == 0.1
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.PReLU(4))
    groups = param_groups(model.parameters(), OptimConfig(no_decay_bn_bias=True))
    assert [len(g["params"]) for g in groups] == [1, 4]
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    opt = build_optimizer(model.parameters(), OptimConfig(), lr=0.3)
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["lr"] == 0.3


def test_clip_gradients_matches_torch():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p) * 10
        q.grad = p.grad.clone()
    norm = clip_gradients(a[:1], a[1:], max_norm=1.0)
    ref = torch.nn.utils.clip_grad_norm_(b, max_norm=1.0)
    assert norm.item() == pytest.approx(ref.item(), rel=1e-6)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)


# ---------------------------------------------------------------------------- faults
def test_stop_signal_records_and_restores_handler():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignal() as stop:
        assert not stop.pending
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == before


def test_nonfinite_guard_counts_in_a_row():
    guard = NonFiniteGuard(limit=2)
    guard.record(3, ["iled"])
    guard.reset()
    guard.record(7, ["rpsd"])
    with pytest.raises(NonFiniteLossError, match=r"step 8 .*non-finite terms: rpsd, total"):
        guard.record(8, ["rpsd", "total"])
    assert guard.state_dict() == {"total": 3, "in_a_row": 2}


# ---------------------------------------------------------------------------- configs
def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


@pytest.mark.parametrize("name, changed", [
    ("sweeps/iled_s0.5", {"loss.iled.s": 0.5}), ("sweeps/iled_s0.7", {"loss.iled.s": 0.7}),
    ("sweeps/iled_s0.9", {}), ("sweeps/iled_r20", {"loss.iled.r": 20.0}),
    ("sweeps/iled_r40", {}), ("sweeps/iled_r60", {"loss.iled.r": 60.0}),
    ("sweeps/rpsd_t0.05", {}), ("sweeps/rpsd_t0.10", {"loss.rpsd.t": 0.10}),
    ("sweeps/rpsd_t0.15", {"loss.rpsd.t": 0.15}),
    ("teacher_gap/iresnet100", {}), ("teacher_gap/iresnet50", {"teacher.name": "iresnet50"}),
    ("teacher_gap/dpn98", {"teacher.name": "timm:dpn98"})])
def test_sweep_and_teacher_gap_configs_change_only_their_keys(name, changed):
    from conftest import REPO
    from fr_distill.config import load_config, to_dict

    base = _leaves(to_dict(load_config(REPO / "configs" / "vggface2_r100_r18_unified.yaml")))
    cfg = _leaves(to_dict(load_config(REPO / "configs" / f"{name}.yaml")))
    diff = {k: v for k, v in cfg.items() if v != base[k]}
    assert diff == {"run.output_dir": f"runs/{name}", **changed}


def test_directory_locks_shared_exclusive_and_released(tmp_path):
    """fr_distill.locks: shared holders coexist and an exclusive request is refused naming
    none; an exclusive holder writes who it is and a shared request is refused naming it;
    released locks are taken again; a symbolic link in the lock file's place is refused."""
    from fr_distill import locks

    path = tmp_path / ".lock"
    readers = [locks.acquire(path, shared=True), locks.acquire(path, shared=True)]
    with pytest.raises(locks.LockBusy) as busy:
        locks.acquire(path)
    assert busy.value.holder is None and str(busy.value) == "processes sharing it"
    for fd in readers:
        locks.release(fd)
    writer = locks.acquire(path)
    assert locks.is_held(writer) and path.read_text().startswith(f"pid {os.getpid()} on ")
    with pytest.raises(locks.LockBusy) as busy:
        locks.acquire(path, shared=True)
    assert busy.value.holder == path.read_text()
    locks.release(writer)
    assert not locks.is_held(writer)
    locks.release(locks.acquire(path, shared=True))
    (tmp_path / "link").symlink_to(path)
    with pytest.raises(OSError):
        locks.acquire(tmp_path / "link")
