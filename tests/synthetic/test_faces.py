"""The synthetic faces: identities are learnable (same > family-mate > stranger), and the
CFP-like set is harder than the LFW-like one."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .conftest import decode, manifest


def test_identities_are_learnable_and_families_are_hard_negatives(synthetic_data):
    p = manifest(synthetic_data)["parameters"]
    n, k, fam = p["num_identities"], p["images_per_identity"], p["family_size"]
    feats = []
    for i in range(n):
        for j in range(k):
            img = decode((synthetic_data / "train" / f"{i:05d}" / f"{j:04d}.jpg").read_bytes())
            x = img[16:104, 16:96].astype(np.float32).reshape(44, 2, 40, 2, 3).mean(axis=(1, 3))
            feats.append(x.ravel() - x.mean())
    feats = np.stack(feats)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    sims = feats @ feats.T
    label = np.repeat(np.arange(n), k)
    same = (label[:, None] == label[None]) & ~np.eye(n * k, dtype=bool)
    family = (label[:, None] // fam == label[None] // fam) & (label[:, None] != label[None])
    stranger = label[:, None] // fam != label[None] // fam
    s_same, s_family, s_stranger = sims[same].mean(), sims[family].mean(), sims[stranger].mean()
    assert s_same > s_family + 0.02 and s_family > s_stranger + 0.1
    # not trivial: a nearest-neighbour on raw pixels is far from perfect
    np.fill_diagonal(sims, -np.inf)
    nn_accuracy = np.mean(label[sims.argmax(axis=1)] == label)
    assert 0.2 < nn_accuracy < 0.98


def pixel_auc(path: Path) -> float:
    """AUC of raw-pixel correlation as a verification score on a .bin set."""
    bins, issame = pickle.loads(path.read_bytes())
    x = np.stack([decode(b)[16:104, 16:96].astype(np.float32).ravel() for b in bins])
    x -= x.mean(axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    scores, same = (x[0::2] * x[1::2]).sum(axis=1), np.array(issame)
    return float((scores[same][:, None] > scores[~same][None]).mean())


def test_cfp_like_set_is_harder_than_lfw_like_set(synthetic_data):
    lfw = pixel_auc(synthetic_data / "synth_lfw.bin")
    cfp = pixel_auc(synthetic_data / "synth_cfp.bin")
    assert 0.6 < lfw < 0.97  # learnable signal, far from solved by raw pixels
    assert cfp < lfw - 0.05
