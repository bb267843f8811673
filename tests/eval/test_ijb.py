"""V2/V3: template pooling, pair scores, TAR@FAR and 1:N search on hand-made tables."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve as sk_roc_curve

from benchmarks.eval import reference_pooling  # InsightFace eval_ijbc.py, numpy loops
from fr_distill.eval import EvalDataError
from fr_distill.eval.ijb import identification, pair_scores, tar_at_far, template_features
from fr_distill.eval.roc import tar_interpolated


def test_pooling_hand_made_table():
    feats = np.array([[1, 0], [3, 0], [0, 2], [0, 5], [4, 4]], dtype=np.float32)
    templates = np.array([7, 7, 7, 3, 3])
    medias = np.array([1, 1, 2, 9, 9])
    ids, pooled = template_features(feats, templates, medias)
    assert ids.tolist() == [3, 7]
    # template 7: mean(media 1) = (2, 0), plus media 2 (0, 2) -> (2, 2); template 3: (2, 4.5)
    expected = np.array([[2, 4.5], [2, 2]]) / np.linalg.norm([[2, 4.5], [2, 2]], axis=1, keepdims=True)
    assert np.allclose(pooled.numpy(), expected, atol=1e-12)
    _, weighted = template_features(feats, templates, medias, faceness=np.array([1, 1, 0.5, 1, 0.25]))
    # template 7: (2, 0) + (0, 1) = (2, 1); template 3: mean((0, 5), (1, 1)) = (0.5, 3)
    expected = np.array([[0.5, 3], [2, 1]]) / np.linalg.norm([[0.5, 3], [2, 1]], axis=1, keepdims=True)
    assert np.allclose(weighted.numpy(), expected, atol=1e-12)


def test_pooling_equals_insightface_loops():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(400, 16)).astype(np.float32)
    templates, medias = rng.integers(0, 40, 400), rng.integers(0, 90, 400)
    ids, pooled = template_features(feats, templates, medias)
    ref, ref_ids = reference_pooling(feats, templates, medias)
    assert np.array_equal(ids, ref_ids)
    assert np.abs(pooled.numpy() - ref).max() < 1e-15


@pytest.mark.parametrize("dense", [True, False])
def test_pair_scores_both_paths(dense):
    rng = np.random.default_rng(1)
    ids = np.array([2, 5, 9, 11, 20])
    feats = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=1)
    t1, t2 = rng.choice(ids, 50), rng.choice(ids, 50)
    scores = pair_scores(ids, feats, t1, t2, chunk_size=16, max_dense_bytes=2 ** 30 if dense else 0)
    row = {t: i for i, t in enumerate(ids)}
    expected = [float(feats[row[a]] @ feats[row[b]]) for a, b in zip(t1, t2)]
    assert np.allclose(scores, expected, atol=1e-14)
    with pytest.raises(EvalDataError, match=r"t2\[1\] = template 7 has no template feature"):
        pair_scores(ids, feats, [2, 5], [5, 7])


def test_tar_at_far_hand_made():
    # 10 impostor scores 0.1..1.0, 4 genuine scores: 0.95, 0.85, 0.55, 0.05
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.95, 0.85, 0.55, 0.05])
    labels = np.array([0] * 10 + [1] * 4)
    tar = tar_at_far(scores, labels, fars=(0.1, 0.22, 0.45))
    # ROC (fpr, tpr) after scikit-learn's dropping of collinear points:
    # (0,0) (.1,0) (.1,.25) (.2,.25) (.2,.5) (.5,.5) (.5,.75) (1,.75) (1,1)
    # nearest: FAR .1 -> fpr .1 with the highest tpr .25; .22 -> fpr .2 -> .5; .45 -> fpr .5 -> .75
    assert tar["nearest"] == {0.1: 0.25, 0.22: 0.5, 0.45: 0.75}
    # interpolated: top of the step at .1; on the flat segment (.2,.5)-(.5,.5) otherwise
    assert tar["interpolated"] == {0.1: 0.25, 0.22: 0.5, 0.45: 0.5}
    fpr, tpr = np.array([0, 0.1, 0.1, 0.3, 1]), np.array([0, 0.2, 0.6, 0.8, 1])
    assert tar_interpolated(fpr, tpr, 0.2) == pytest.approx(0.7)
    assert tar_interpolated(fpr, tpr, 0.05) == pytest.approx(0.1)
    assert tar_interpolated(fpr, tpr, 0.1) == 0.6


def test_tar_at_far_equals_sklearn_nearest_point():
    rng = np.random.default_rng(5)
    for n, decimals in ((40000, 3), (40000, 8)):
        labels = (rng.random(n) < 0.05).astype(int)
        scores = (rng.normal(size=n) + 2.5 * labels).round(decimals)
        fars = (1e-4, 1e-3, 1e-2, 1e-1, 0.3)
        fpr, tpr, _ = sk_roc_curve(labels, scores)
        flipped_fpr, flipped_tpr = np.flipud(fpr), np.flipud(tpr)
        expected = {}
        for far in fars:
            _, index = min(zip(abs(flipped_fpr - far), range(len(flipped_fpr))))
            expected[far] = flipped_tpr[index]
        assert tar_at_far(scores, labels, fars)["nearest"] == expected


def test_identification_hand_made():
    angle = np.deg2rad([0, 90, 180, 270])
    gallery = np.stack([np.cos(angle), np.sin(angle)], 1)  # subjects 10, 11, 12, 13
    g_ids = np.array([10, 11, 12, 13])

    def at(deg):
        return [np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))]

    probes = np.array([at(10), at(80), at(155), at(195), at(44), at(30), at(70)])
    p_ids = np.array([10, 10, 12, 12, 13, 99, 98])  # the last two are non-mated
    result = identification(gallery, g_ids, probes, p_ids, ranks=(1, 2, 3), fpirs=(0.0, 0.5))
    # mate ranks: 10° -> 1; 80° -> 2 (90° is nearer); 155° -> 1; 195° -> 1; 44° vs 270° -> 3
    assert result["mated"] == 5 and result["nonmated"] == 2
    assert result["rank1"] == pytest.approx(3 / 5)
    assert result["rank2"] == pytest.approx(4 / 5) and result["rank3"] == pytest.approx(1.0)
    # non-mated best scores: cos 20° (70° vs 90°) = .940, cos 30° = .866
    # FPIR 0 -> threshold .940: rank-1 mates above it: 10° (.985), 195° (.966)
    # FPIR .5 -> one non-mated may pass, threshold .866: also 155° (.906)
    assert result["tpir_at_fpir"][0.0] == pytest.approx(2 / 5)
    assert result["tpir_at_fpir"][0.5] == pytest.approx(3 / 5)
