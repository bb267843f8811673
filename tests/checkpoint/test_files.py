"""Checkpoint files: round trip and checksum sidecar, keep-last, fallback from a damaged
newest file, crashes while writing, the RNG state through a weights-only file."""
from __future__ import annotations

import hashlib
import logging
import os
import random

import numpy as np
import pytest
import torch

from fr_distill.checkpoint import files as ckpt


def _payload(step: int) -> dict:
    return {"format": "fr_distill", "version": 1, "step": step,
            "student": {"w": torch.full((4, 4), float(step))}, "rng": (1, (2, 3), None)}


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
