"""Uncertainty of a study's numbers (METHOD S1): spread over seeds and paired bootstrap intervals.

A study evaluates every model on the same evaluation units (verification pairs, template
pairs), and every variant with the same seeds (the same initialization and data order), so a
variant and the baseline are compared **paired**: by seed and by unit. The 95 % interval of
the difference ``mean_seeds[M(variant, s) − M(baseline, s)]`` comes from a bootstrap that, in
each replicate, draws the seeds with replacement and, independently, the units with
replacement (one draw of the units shared by every model of the replicate), and recomputes
the metric ``M`` of every model on the drawn units. The interval is the replicates' 2.5th
and 97.5th percentiles. Resampling the seeds captures training noise, resampling the units
the finite evaluation set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

Metric = Callable[[dict[str, np.ndarray], np.ndarray | None], float]
"""``metric(arrays, units)``: a model's metric on the units ``units`` (indices, with
repetition) of its per-unit ``arrays``; ``units=None`` means all units."""


@dataclass(frozen=True)
class Interval:
    """A paired difference ``value`` (on all units and seeds) and its 95 % interval."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"diff": self.value, "ci95": [self.low, self.high]}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def paired_bootstrap(variant: Sequence[dict[str, np.ndarray]],
                     baseline: Sequence[dict[str, np.ndarray]], metric: Metric,
                     replicates: int = 2000, seed: int = 0) -> Interval:
    """The paired difference of ``metric`` between ``variant[s]`` and ``baseline[s]`` (the
    per-unit arrays of each seed ``s``, seeds in the same order) with its bootstrap interval.

    A single model may stand for every seed of one side (``[teacher] * S``): its seed draws
    then only change the other side. Every model's arrays must hold the same units.
    """
    if len(variant) != len(baseline) or not variant:
        raise ValueError(f"paired_bootstrap: {len(variant)} variant and {len(baseline)} "
                         f"baseline models; need the same non-zero number")
    counts = {len(next(iter(arrays.values()))) for arrays in (*variant, *baseline)}
    if len(counts) != 1:
        raise ValueError(f"paired_bootstrap: models hold different numbers of units {sorted(counts)}")
    return _bootstrap(len(variant), counts.pop(), lambda s, units: metric(variant[s], units)
                      - metric(baseline[s], units), replicates, seed)


def bootstrap_interval(models: Sequence[dict[str, np.ndarray]], metric: Metric,
                       replicates: int = 2000, seed: int = 0) -> Interval:
    """``metric`` of one variant (mean over its seeds' ``models``) with its 95 % bootstrap
    interval, resampling seeds and units as :func:`paired_bootstrap` does."""
    if not models:
        raise ValueError("bootstrap_interval: no model")
    units = len(next(iter(models[0].values())))
    return _bootstrap(len(models), units, lambda s, drawn: metric(models[s], drawn),
                      replicates, seed)


def _bootstrap(seeds: int, units: int, value: Callable[[int, np.ndarray | None], float],
               replicates: int, seed: int) -> Interval:
    """``mean_s value(s, all units)`` and the percentile interval of its replicates, each
    drawing the seeds and the units with replacement."""
    observed = float(np.mean([value(s, None) for s in range(seeds)]))
    rng = np.random.default_rng(seed)
    estimates = np.empty(replicates)
    for r in range(replicates):
        drawn_units = rng.integers(0, units, size=units)
        drawn_seeds = rng.integers(0, seeds, size=seeds).tolist()
        per_seed = {s: value(s, drawn_units) for s in set(drawn_seeds)}
        estimates[r] = np.mean([per_seed[s] for s in drawn_seeds])
    low, high = np.percentile(estimates, [2.5, 97.5])
    return Interval(observed, float(low), float(high))


def accuracy(arrays: dict[str, np.ndarray], units: np.ndarray | None) -> float:
    """Verification accuracy (%) of the pairs' verdicts ``arrays["correct"]`` (pooled over
    sets when they are concatenated: for sets of equal size, the mean of their accuracies)."""
    correct = arrays["correct"]
    return 100.0 * float((correct if units is None else correct[units]).mean())


def tar_at_far_metric(far: float) -> Metric:
    """TAR (%) at FAR ``far`` on template pairs (``arrays["scores"]``, ``arrays["labels"]``):
    the share of genuine pairs scoring strictly above the ``(⌊far · n⌋ + 1)``-th highest of
    the ``n`` impostor scores, a threshold that at most ``far · n`` impostors pass."""

    def metric(arrays: dict[str, np.ndarray], units: np.ndarray | None) -> float:
        scores, labels = arrays["scores"], arrays["labels"]
        if units is not None:
            scores, labels = scores[units], labels[units]
        impostors = np.sort(scores[~labels])[::-1]
        genuine = scores[labels]
        if len(impostors) == 0 or len(genuine) == 0:
            return float("nan")
        allowed = int(np.floor(far * len(impostors)))
        threshold = impostors[min(allowed, len(impostors) - 1)]
        return 100.0 * float((genuine > threshold).mean())

    return metric
