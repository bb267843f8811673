"""The ROC curve against scikit-learn's, ties included, and TAR at FAR read from it."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve as sk_roc_curve

from fr_distill.eval.roc import roc_curve, tar_interpolated, tar_nearest


def test_fast_roc_equals_sklearn_with_ties():
    rng = np.random.default_rng(1)
    for n, decimals in ((50, 1), (5000, 2), (20000, 6)):
        scores = rng.normal(size=n).round(decimals).astype(np.float32)
        labels = (rng.random(n) < 0.3).astype(int)
        fpr, tpr, thr = roc_curve(scores, labels)
        sk_fpr, sk_tpr, sk_thr = sk_roc_curve(labels, scores)
        assert np.array_equal(fpr, sk_fpr) and np.array_equal(tpr, sk_tpr)
        assert np.array_equal(thr[1:], sk_thr[1:]) and np.isinf(thr[0])
        for far in (1e-4, 1e-3, 1e-2, 1e-1, 0.5):
            flipped_fpr, flipped_tpr = np.flipud(sk_fpr), np.flipud(sk_tpr)
            _, index = min(zip(abs(flipped_fpr - far), range(len(flipped_fpr))))
            assert tar_nearest(fpr, tpr, far) == flipped_tpr[index]
            assert 0.0 <= tar_interpolated(fpr, tpr, far) <= 1.0
