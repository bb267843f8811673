"""Uncertainty of a study's numbers (METHOD S1): the bootstrap and the metrics on known
inputs."""
from __future__ import annotations

import numpy as np
import pytest

from fr_distill.study.stats import (accuracy, bootstrap_interval, mean_std, paired_bootstrap,
                                    tar_at_far_metric)


def test_mean_std_is_the_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)


def test_bootstrap_of_a_constant_difference_is_that_constant():
    base = {"correct": np.array([True, False] * 50)}
    better = {"correct": base["correct"] | (np.arange(100) % 4 == 1)}  # +25 points, same pairs
    interval = paired_bootstrap([better] * 3, [base] * 3, accuracy, replicates=2000)
    assert interval.value == pytest.approx(25.0)
    # every resample of pairs changes both models alike only where they agree: the difference
    # is the share of the 25 flipped pairs among the drawn ones, binomial around 25
    assert interval.low < 25.0 < interval.high
    sd = 100 * np.sqrt(0.25 * 0.75 / 100)
    assert interval.low == pytest.approx(25.0 - 1.96 * sd, abs=2.0)
    assert interval.high == pytest.approx(25.0 + 1.96 * sd, abs=2.0)


def test_bootstrap_over_seeds_alone_has_the_exact_percentiles():
    """Differences identical on every pair but 1, 2, 3 points by seed: resampling pairs
    changes nothing, resampling 3 seeds gives means from 1 to 3 where P(mean = 1) = 1/27 > 2.5 %."""
    n = 100
    base = {"correct": np.zeros(n, dtype=bool)}
    variants = [{"correct": np.arange(n) < k} for k in (1, 2, 3)]  # k % of pairs correct
    interval = paired_bootstrap(variants, [base] * 3, lambda arrays, units: float(
        100 * arrays["correct"].mean()), replicates=2000)  # a metric that ignores the pair draw
    assert interval.value == pytest.approx(2.0)
    assert (interval.low, interval.high) == (pytest.approx(1.0), pytest.approx(3.0))


def test_bootstrap_refuses_unpaired_inputs():
    one = {"correct": np.ones(4, dtype=bool)}
    with pytest.raises(ValueError, match="same non-zero number"):
        paired_bootstrap([one, one], [one], accuracy)
    with pytest.raises(ValueError, match="different numbers of units"):
        paired_bootstrap([one], [{"correct": np.ones(5, dtype=bool)}], accuracy)


def test_tar_at_far_by_hand():
    # 10 impostors 0.0..0.9, 4 genuine pairs: at FAR 0.1 one impostor (0.9) may pass, the
    # threshold is the 2nd highest impostor (0.8): genuine 0.85 and 0.95 pass, 0.5 and 0.8 do not.
    scores = np.array([*np.arange(10) / 10, 0.5, 0.8, 0.85, 0.95])
    labels = np.array([False] * 10 + [True] * 4)
    arrays = {"scores": scores, "labels": labels}
    assert tar_at_far_metric(0.1)(arrays, None) == pytest.approx(50.0)
    assert tar_at_far_metric(0.05)(arrays, None) == pytest.approx(25.0)  # above 0.9
    units = np.array([0, 1, 12, 13, 13])  # impostors 0.0, 0.1; genuine 0.85, 0.95, 0.95
    assert tar_at_far_metric(0.1)(arrays, units) == pytest.approx(100.0)


def test_accuracy_and_its_interval_use_every_unit():
    arrays = {"correct": np.array([1, 1, 0, 0], bool)}
    assert accuracy(arrays, None) == pytest.approx(50.0)
    assert accuracy(arrays, np.array([0, 0, 2])) == pytest.approx(200 / 3)
    # 1,000 pairs at 80 %: the interval is the binomial one, 80 ± 1.96·sqrt(0.8·0.2/1000)·100
    model = {"correct": np.arange(1000) % 5 != 0}
    interval = bootstrap_interval([model], accuracy, replicates=2000)
    half = 1.96 * 100 * np.sqrt(0.8 * 0.2 / 1000)
    assert interval.value == pytest.approx(80.0)
    assert interval.low == pytest.approx(80 - half, abs=0.5)
    assert interval.high == pytest.approx(80 + half, abs=0.5)
