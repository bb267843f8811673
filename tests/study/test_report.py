"""The study report: the mean accuracy interval pools every set."""
from __future__ import annotations

import numpy as np
import pytest


def test_report_pools_every_set_for_the_mean_accuracy_interval():
    """``mean acc`` resamples the pairs of all sets: here set ``a`` differs on every pair and
    set ``b`` on none, so its difference is 50 points with a binomial-width interval, not set
    ``a``'s degenerate [100, 100]."""
    from types import SimpleNamespace

    from fr_distill.study.report import differences

    def model(a_correct: bool) -> SimpleNamespace:
        return SimpleNamespace(ok=True, outcomes={"ijb": {}, "bin": {
            "a": {"correct": np.full(200, a_correct)}, "b": {"correct": np.ones(200, bool)}}})

    spec = SimpleNamespace(baseline="none", seeds=[1], bootstrap=2000)
    diffs = differences(spec, model(True), {"none": {1: model(False)}})["teacher"]
    assert diffs["a acc"] == {"diff": 100.0, "ci95": [100.0, 100.0]}
    low, high = diffs["mean acc"]["ci95"]
    assert diffs["mean acc"]["diff"] == pytest.approx(50.0)
    half = 1.96 * 100 * np.sqrt(0.25 / 400)  # the share of drawn pairs from set a
    assert low == pytest.approx(50 - half, abs=1.0) and high == pytest.approx(50 + half, abs=1.0)
