"""Fault handling of a run: the stop signal and the non-finite-loss guard."""
from __future__ import annotations

import os
import signal

import pytest

from fr_distill.engine.faults import NonFiniteGuard, NonFiniteLossError, StopSignal


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
