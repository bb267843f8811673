"""Verification `.bin` sets: safe loading and the InsightFace 10-fold protocol (METHOD V1).

``load_bin`` reads an InsightFace `.bin` (a pickle of ``(bins, issame_list)``) with the
restricted unpickler of :mod:`fr_distill.eval.safe_pickle` and decodes the images.
``evaluate`` scores flip-fused, L2-normalized embeddings of the ``2N`` images:

* ``accuracy_mean`` / ``accuracy_std`` — InsightFace's protocol: squared L2 distance of each
  pair, thresholds ``0, 0.01, …, 3.99``, 10 contiguous folds without shuffle (the split of
  ``sklearn.model_selection.KFold(10, shuffle=False)``); for each fold the threshold with the
  best accuracy on the other folds (first best in threshold order) scores the held-out fold.
* ``best_threshold_accuracy`` — OpenSphere's ACC: the best accuracy over every ROC
  operating point, on all pairs.
* ``eer`` — OpenSphere's EER: the FPR where the linearly interpolated ROC meets ``tpr = 1 - fpr``.
* ``auc`` — area under the ROC (trapezoids, as ``sklearn.metrics.auc``).
* ``val_at_far_1e-3`` — InsightFace's VAL@FAR: per fold, the distance threshold giving
  FAR = 1e-3 on the training folds (thresholds ``0, 0.001, …, 3.999``, the threshold linearly
  interpolated against the training FAR — InsightFace's ``interp1d(kind="slinear")``, which
  current scipy refuses on repeated FARs, so the interpolation runs over the distinct FARs)
  and the true-accept rate at it on the held-out fold, averaged over folds.

Similarity for the ROC-based metrics is ``-distance``. All rates are fractions in [0, 1].

A :class:`PairSet` is a set in the `.bin` layout, whatever its source: :func:`bin_pair_set`
reads a `.bin`, :func:`fr_distill.eval.folder.folder_pair_set` pairs a folder of aligned faces.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fr_distill.paths import atomic_writer, require_writable_file

from .errors import EvalDataError
from .extract import EncodedImages
from .roc import roc_curve
from .safe_pickle import safe_load

ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
VAL_FAR_TARGET = 1e-3
NROF_FOLDS = 10
MIN_PAIRS = NROF_FOLDS  # one pair per fold at least
ALIGNED_SIZE = (112, 112)  # (H, W) of the aligned faces every set holds

#: The metrics :func:`evaluate` returns for each set (``eval.best_metric`` = ``<set>/<metric>``).
METRICS = ("accuracy_mean", "accuracy_std", "best_threshold_accuracy", "eer", "auc",
           "val_at_far_1e-3")


def read_bin(path: str) -> tuple[list[bytes], np.ndarray]:
    """The encoded images and the ``issame`` flags of a verification `.bin` (safe unpickling)."""
    data = safe_load(path)
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise EvalDataError(f"{path}: expected a pickle of (bins, issame_list)")
    bins, issame = data
    if not isinstance(bins, (list, tuple)):
        raise EvalDataError(f"{path}: bins must be a list of encoded images")
    issame = np.asarray(issame)
    if issame.ndim != 1 or not all(isinstance(v, (bool, np.bool_)) for v in issame.tolist()):
        raise EvalDataError(f"{path}: issame_list must be a flat list of booleans")
    if len(issame) == 0:
        raise EvalDataError(f"{path}: holds no pairs (empty issame_list)")
    if len(bins) != 2 * len(issame):
        raise EvalDataError(f"{path}: {len(bins)} images for {len(issame)} pairs "
                            f"(expected {2 * len(issame)})")
    for index, payload in enumerate(bins):
        if not isinstance(payload, (bytes, bytearray)):
            raise EvalDataError(f"{path}: image {index} is {type(payload).__name__}, not bytes")
    return list(bins), issame.astype(bool)


@dataclass
class PairSet:
    """A verification set in the `.bin` layout: ``payloads[2k]``, ``payloads[2k + 1]`` (encoded
    images) form pair ``k``, ``issame[k]`` its label. ``source`` (file or folder) names the set
    in messages; ``cache_id`` identifies its content for the feature cache."""

    name: str
    source: str
    payloads: list[bytes]
    issame: np.ndarray
    cache_id: str


def write_bin(pair_set: PairSet, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``pair_set`` as a verification `.bin` InsightFace's tools read too: a pickle
    (protocol 4) of ``(list of bytes, list of bool)``, which its ``load_bin`` unpickles (plain or
    with ``encoding="bytes"``) and decodes image by image. Written atomically; an existing
    file is refused unless ``overwrite``."""
    path = Path(path)
    check_bin_destination(path, overwrite)
    try:
        with atomic_writer(path) as handle:
            pickle.dump(([bytes(p) for p in pair_set.payloads],
                         [bool(same) for same in pair_set.issame]), handle, protocol=4)
    except OSError as err:
        raise EvalDataError(f"{path}: cannot write ({err.strerror or err})") from None
    return path


def check_bin_destination(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse, before any image is read, a `.bin` destination that cannot be written (a
    read-only file system, a missing directory: one line naming the path) or that exists
    while ``overwrite`` is off."""
    path = Path(path)
    require_writable_file(path, "output .bin")
    if path.exists() and not overwrite:
        raise EvalDataError(f"{path} already exists; remove it or pass --force to overwrite")


def bin_set_name(path: str) -> str:
    """The name of a `.bin` set in the results: ``lfw`` for ``…/lfw.bin``."""
    return Path(path).name.removesuffix(".bin")


def bin_pair_set(path: str) -> PairSet:
    """The pairs of a verification `.bin`, named by :func:`bin_set_name`."""
    payloads, issame = read_bin(path)
    return PairSet(bin_set_name(path), path, payloads, issame, str(path))


def load_bin(path: str, image_size: tuple[int, int] = ALIGNED_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Read a verification `.bin`: ``(images uint8 [2N, 3, H, W] RGB, issame bool [N])``.

    Every image must decode to ``image_size`` (H, W); otherwise :class:`EvalDataError`
    names the file and the image index.
    """
    payloads, issame = read_bin(path)
    return EncodedImages(payloads, path, image_size).load(0, len(payloads)), issame


def kfold_splits(count: int, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train, test)`` index arrays of ``KFold(folds, shuffle=False)`` on ``count`` items.

    Contiguous test folds; the first ``count % folds`` folds hold one extra item.
    """
    if folds < 2 or count < folds:
        raise ValueError(f"kfold_splits: need 2 <= folds <= count, got folds={folds}, count={count}")
    sizes = np.full(folds, count // folds)
    sizes[: count % folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    indices = np.arange(count)
    return [(np.concatenate([indices[:lo], indices[hi:]]), indices[lo:hi])
            for lo, hi in zip(bounds[:-1], bounds[1:])]


def _accuracies(thresholds: np.ndarray, dist: np.ndarray, issame: np.ndarray) -> np.ndarray:
    """Accuracy of ``dist < t`` as the same-identity prediction, for every threshold ``t``."""
    predict = dist[None, :] < thresholds[:, None]
    return (predict == issame[None, :]).mean(axis=1)


def _val_threshold(dist: np.ndarray, issame: np.ndarray, far_target: float) -> float:
    """Distance threshold whose FAR on these pairs is ``far_target`` (0 when unreachable)."""
    different = dist[~issame]
    far = (different[None, :] < VAL_THRESHOLDS[:, None]).mean(axis=1)
    if far.max() < far_target:
        return 0.0
    distinct_last = np.concatenate([far[1:] != far[:-1], [True]])
    return float(np.interp(far_target, far[distinct_last], VAL_THRESHOLDS[distinct_last]))


def _pair_distances(embeddings, issame) -> tuple[np.ndarray, np.ndarray]:
    emb = embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) \
        else np.asarray(embeddings)
    same = np.asarray(issame).astype(bool).reshape(-1)
    if emb.ndim != 2 or emb.shape[0] != 2 * same.shape[0]:
        raise ValueError(f"evaluate: embeddings {tuple(emb.shape)} do not hold 2 rows for each "
                         f"of the {same.shape[0]} pairs")
    emb = emb.astype(np.float64)
    return ((emb[0::2] - emb[1::2]) ** 2).sum(axis=1), same


def evaluate(embeddings, issame, nrof_folds: int = NROF_FOLDS,
             outcomes: dict | None = None) -> dict[str, float]:
    """Verification metrics of pairs ``(2k, 2k+1)`` of ``embeddings`` (METHOD V1; see module doc).

    ``embeddings``: ``[2N, D]`` numpy or torch, flip-fused and L2-normalized.
    ``issame``: ``N`` booleans. With ``outcomes``, ``outcomes["correct"]`` receives the
    10-fold protocol's verdict on each pair (bool ``[N]``: the held-out fold's threshold
    classified it correctly), the per-pair data a paired bootstrap resamples.
    """
    dist, same = _pair_distances(embeddings, issame)
    fold_acc, fold_val = [], []
    correct = np.zeros(len(dist), dtype=bool)
    for train, test in kfold_splits(len(dist), nrof_folds):
        best = int(np.argmax(_accuracies(ACCURACY_THRESHOLDS, dist[train], same[train])))
        correct[test] = (dist[test] < ACCURACY_THRESHOLDS[best]) == same[test]
        fold_acc.append(float(correct[test].mean()))
        threshold = _val_threshold(dist[train], same[train], VAL_FAR_TARGET)
        genuine = same[test]
        fold_val.append(float((dist[test][genuine] < threshold).mean()) if genuine.any() else 0.0)
    if outcomes is not None:
        outcomes["correct"] = correct
    fpr, tpr, _ = roc_curve(-dist, same)
    positives, negatives = int(same.sum()), int((~same).sum())
    best_acc = float(np.max(tpr * positives + (1.0 - fpr) * negatives) / len(same))
    return {
        "accuracy_mean": float(np.mean(fold_acc)),
        "accuracy_std": float(np.std(fold_acc)),
        "best_threshold_accuracy": best_acc,
        "eer": equal_error_rate(fpr, tpr),
        "auc": float(np.trapezoid(tpr, fpr)),  # fpr rises: sklearn.metrics.auc
        "val_at_far_1e-3": float(np.mean(fold_val)),
    }


def equal_error_rate(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """The FPR where the piecewise-linear ROC crosses ``tpr = 1 - fpr`` (OpenSphere's EER)."""
    gap = 1.0 - fpr - tpr  # decreasing along the curve, from 1 at (0, 0) to -1 at (1, 1)
    cross = int(np.argmax(gap <= 0))
    if gap[cross] == 0:
        return float(fpr[cross])
    x0, x1, g0, g1 = fpr[cross - 1], fpr[cross], gap[cross - 1], gap[cross]
    if x1 == x0:
        return float(x0)
    return float(x0 + (x1 - x0) * g0 / (g0 - g1))
