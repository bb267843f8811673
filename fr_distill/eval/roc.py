"""ROC curve by one sort and a cumulative sum, point-for-point equal to scikit-learn's.

``roc_curve`` here returns exactly the ``(fpr, tpr, thresholds)`` of
``sklearn.metrics.roc_curve(labels, scores)`` with its default ``drop_intermediate=True``:
one point per distinct score (ties collapse into one point), points in the middle of a
straight run (zero second difference of both false- and true-positive counts) dropped, and a
leading ``(0, 0)`` point at threshold ``+inf``. Rates are computed in float64 from integer
counts, as scikit-learn does, so TAR values read off the curve are bit-identical. It runs in
torch, on the GPU when the scores are there, and on millions of scores is several times
faster than scikit-learn (one ``torch.sort`` instead of a stable mergesort plus copies).

``tar_nearest`` and ``tar_interpolated`` read TAR at a FAR off such a curve (METHOD V2).
"""
from __future__ import annotations

import numpy as np
import torch


def _as_tensor(values, dtype=None) -> torch.Tensor:
    tensor = values if isinstance(values, torch.Tensor) else torch.from_numpy(np.asarray(values))
    return tensor.reshape(-1) if dtype is None else tensor.reshape(-1).to(dtype)


def _curve(score: torch.Tensor, label: torch.Tensor, positives_total: int,
           negatives_total: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's ROC points of the (highest) ``score``s given, rates over the totals."""
    sorted_score, order = torch.sort(score, descending=True)
    positives = torch.cumsum(label[order], 0, dtype=torch.int64)
    last = torch.tensor([score.numel() - 1], device=score.device)
    ends = torch.cat([torch.nonzero(sorted_score[1:] != sorted_score[:-1]).reshape(-1), last])
    tps = positives[ends]
    fps = ends + 1 - tps
    thresholds = sorted_score[ends]
    if ends.numel() > 2:
        bends = (torch.diff(fps, n=2) != 0) | (torch.diff(tps, n=2) != 0)
        keep = torch.cat([bends.new_ones(1), bends, bends.new_ones(1)])
        tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
    tps = np.concatenate([[0.0], tps.cpu().numpy().astype(np.float64)])
    fps = np.concatenate([[0.0], fps.cpu().numpy().astype(np.float64)])
    thresholds = np.concatenate([[np.inf], thresholds.cpu().numpy().astype(np.float64)])
    fpr = fps / negatives_total if negatives_total > 0 else np.full(fps.shape, np.nan)
    tpr = tps / positives_total if positives_total > 0 else np.full(tps.shape, np.nan)
    return fpr, tpr, thresholds


def _inputs(scores, labels) -> tuple[torch.Tensor, torch.Tensor]:
    score = _as_tensor(scores)
    label = (_as_tensor(labels).to(device=score.device) != 0).to(torch.int64)
    if score.numel() != label.numel():
        raise ValueError(f"roc_curve: {score.numel()} scores but {label.numel()} labels")
    if score.numel() == 0:
        raise ValueError("roc_curve: no scores")
    if torch.isnan(score).any():
        raise ValueError("roc_curve: scores contain NaN")
    return score, label


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` of ``labels`` (1 = genuine) ranked by ``scores`` (higher = more similar).

    Equal to ``sklearn.metrics.roc_curve(labels, scores)``; float64 numpy arrays.
    """
    score, label = _inputs(scores, labels)
    positives = int(label.sum())
    return _curve(score, label, positives, score.numel() - positives)


def roc_curve_head(scores, labels, max_fpr: float) -> tuple[np.ndarray, np.ndarray, bool]:
    """The leading part of :func:`roc_curve` reaching at least ``max_fpr``: ``(fpr, tpr, cut)``.

    Only the scores at or above the score that ``ceil(max_fpr·N_neg) + 1`` negatives reach
    (found by selection, not sorting) are sorted, so reading TAR at small FARs off millions of
    scores costs a fraction of a full sort. The points are those of the full curve except that
    the last one is kept even where the full curve drops it; ``cut`` says whether the head
    is shorter than the full curve.
    """
    score, label = _inputs(scores, labels)
    positives = int(label.sum())
    negatives = score.numel() - positives
    needed = int(np.ceil(max_fpr * negatives)) + 1
    if needed >= negatives:
        return (*_curve(score, label, positives, negatives)[:2], False)
    threshold = torch.kthvalue(score[label == 0], negatives - needed + 1).values
    head = score >= threshold
    fpr, tpr, _ = _curve(score[head], label[head], positives, negatives)
    return fpr, tpr, True


def nearest_index(fpr: np.ndarray, far: float) -> int:
    """Index of the ROC point InsightFace's ``eval_ijbc.py`` reads TAR from at ``far``.

    InsightFace flips the curve and takes the first minimum of ``|fpr - far|``; on the
    unflipped curve that is the last minimum, i.e. among equally near points the one with
    the highest TPR.
    """
    return len(fpr) - 1 - int(np.argmin(np.abs(fpr[::-1] - far)))


def tar_nearest(fpr: np.ndarray, tpr: np.ndarray, far: float) -> float:
    """TAR at the ROC point whose FPR is nearest ``far`` (see :func:`nearest_index`)."""
    return float(tpr[nearest_index(fpr, far)])


def tar_interpolated(fpr: np.ndarray, tpr: np.ndarray, far: float) -> float:
    """TAR at ``far`` by linear interpolation along the ROC polyline.

    Where the curve has a vertical step at exactly ``far`` the top of the step is used;
    between two FPRs the segment from the last point at the lower FPR to the first point at
    the higher FPR is interpolated.
    """
    above = int(np.searchsorted(fpr, far, side="right"))  # first point with fpr > far
    if above == 0:
        return float(tpr[0])
    last = above - 1
    if above == len(fpr) or fpr[last] == far:
        return float(tpr[last])
    step = (far - fpr[last]) / (fpr[above] - fpr[last])
    return float(tpr[last] + step * (tpr[above] - tpr[last]))
