"""V1: safe `.bin` loading, 10-fold accuracy and the ROC-based metrics against independent answers."""
from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
from PIL import Image
from scipy.interpolate import interp1d
from scipy.optimize import brentq
from sklearn.metrics import roc_auc_score, roc_curve as sk_roc_curve
from sklearn.model_selection import KFold

from fr_distill.eval import EvalDataError
from fr_distill.eval.verification import METRICS, evaluate, kfold_splits, load_bin
from tests.eval_data import encode, face_images, write_bin


def embeddings_with_distances(dist: np.ndarray) -> np.ndarray:
    """Unit 2-D embeddings whose pair k has squared distance dist[k] (d² = 2 - 2 cos θ)."""
    theta = np.arccos(1 - dist / 2)
    rows = np.zeros((2 * len(dist), 2))
    rows[0::2, 0] = 1.0
    rows[1::2, 0], rows[1::2, 1] = np.cos(theta), np.sin(theta)
    return rows


def brute_force_10fold(dist: np.ndarray, same: np.ndarray) -> list[float]:
    thresholds = [i / 100 for i in range(400)]
    accs = []
    for train, test in KFold(10, shuffle=False).split(dist):
        def acc(t, idx):
            return sum((dist[i] < t) == same[i] for i in idx) / len(idx)
        best = max(thresholds, key=lambda t: (acc(t, train), -t))
        accs.append(acc(best, test))
    return accs


@pytest.mark.parametrize("count", [10, 23, 6000])
def test_kfold_splits_equal_sklearn(count):
    ours = kfold_splits(count, 10)
    for (train, test), (sk_train, sk_test) in zip(ours, KFold(10, shuffle=False).split(np.arange(count))):
        assert np.array_equal(train, sk_train) and np.array_equal(test, sk_test)


def test_hand_made_case_matches_independent_answers():
    rng = np.random.default_rng(3)
    same = rng.random(60) < 0.5
    dist = np.where(same, rng.uniform(0.2, 1.6, 60), rng.uniform(1.0, 3.2, 60)).round(3)
    metrics = evaluate(embeddings_with_distances(dist), same)
    folds = brute_force_10fold(dist, same)
    assert metrics["accuracy_mean"] == pytest.approx(np.mean(folds), abs=1e-12)
    assert metrics["accuracy_std"] == pytest.approx(np.std(folds), abs=1e-12)
    cuts = [-np.inf] + sorted(dist)
    best = max(np.mean((dist <= c) == same) for c in cuts)
    assert metrics["best_threshold_accuracy"] == pytest.approx(best, abs=1e-12)
    fpr, tpr, _ = sk_roc_curve(same, -dist)
    assert metrics["eer"] == pytest.approx(brentq(lambda x: 1 - x - interp1d(fpr, tpr)(x), 0, 1), abs=1e-9)
    assert metrics["auc"] == pytest.approx(roc_auc_score(same, -dist), abs=1e-12)


def test_perfect_and_chance_embeddings():
    rng = np.random.default_rng(0)
    same = rng.random(3000) < 0.5
    perfect = np.zeros((6000, 4))
    perfect[0::2, 0] = 1.0
    perfect[1::2][same, 0] = 1.0
    perfect[1::2][~same, 1] = 1.0  # squared distance 0 for genuine, 2 for impostor pairs
    m = evaluate(perfect, same)
    assert tuple(m) == METRICS  # the names eval.best_metric is checked against
    assert (m["accuracy_mean"], m["accuracy_std"], m["best_threshold_accuracy"]) == (1.0, 0.0, 1.0)
    assert (m["eer"], m["auc"], m["val_at_far_1e-3"]) == (0.0, 1.0, 1.0)
    chance = rng.normal(size=(6000, 64))
    chance /= np.linalg.norm(chance, axis=1, keepdims=True)
    m = evaluate(chance, same)
    assert abs(m["accuracy_mean"] - 0.5) < 0.03 and abs(m["auc"] - 0.5) < 0.03
    assert abs(m["eer"] - 0.5) < 0.03 and m["val_at_far_1e-3"] < 0.01


def test_val_at_far_reversed_scores_is_zero():
    same = np.arange(2000) % 2 == 0
    dist = np.where(same, 3.0, 1.0)  # every genuine pair farther than every impostor pair
    assert evaluate(embeddings_with_distances(dist), same)["val_at_far_1e-3"] == 0.0


def test_load_bin_decodes_jpeg_and_png(tmp_path):
    images, issame = write_bin(tmp_path / "j.bin", 4, seed=1, protocol=2)
    loaded, flags = load_bin(str(tmp_path / "j.bin"))
    assert loaded.dtype == np.uint8 and loaded.shape == (8, 3, 112, 112)
    assert np.array_equal(flags, issame)
    reference = np.stack([np.asarray(Image.open(io.BytesIO(encode(img))).convert("RGB")) for img in images])
    assert np.abs(loaded.transpose(0, 2, 3, 1).astype(int) - reference).max() <= 1
    pngs = face_images(4, 112, 5)
    with open(tmp_path / "p.bin", "wb") as handle:
        pickle.dump(([encode(i, "PNG") for i in pngs], np.array([True, False])), handle, protocol=5)
    loaded, flags = load_bin(str(tmp_path / "p.bin"))
    assert np.array_equal(loaded.transpose(0, 2, 3, 1), pngs) and flags.tolist() == [True, False]


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([Payload(marker)], [True])))
    with pytest.raises(EvalDataError) as err:
        load_bin(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value) and "not allowed" in str(err.value)
    assert not marker.exists()
    path.write_bytes(pickle.dumps(([b"x", b"y"], np.array([1.5]))))
    with pytest.raises(EvalDataError, match="not allowed"):
        load_bin(str(path))


def test_image_size_mismatch_names_file_and_index(tmp_path):
    images = face_images(4, 112, 2)
    bins = [encode(i) for i in images]
    bins[3] = encode(face_images(1, 100, 3)[0])
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps((bins, [True, False])))
    with pytest.raises(EvalDataError, match=r"bad\.bin: image 3 is 100x100, expected 112x112"):
        load_bin(str(path))
    path.write_bytes(pickle.dumps((bins[:3], [True, False])))
    with pytest.raises(EvalDataError, match="3 images for 2 pairs"):
        load_bin(str(path))
