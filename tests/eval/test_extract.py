"""Feature extraction: alignment, 2-rank sharding equal to 1 rank (`.bin`, IJB, TinyFace),
resume from cached shards."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, run_torchrun
from fr_distill.data.align import ARCFACE_TEMPLATE, estimate_similarity
from fr_distill.eval.extract import AlignedImages, EncodedImages, extract_features, last_run
from fr_distill.eval.report import to_jsonable
from fr_distill.eval.runner import evaluate_model
from fr_distill.eval.verification import read_bin
from tests.eval_data import assert_results_close, tiny_model, write_bin, write_ijb, write_tinyface


def blob_image(points: np.ndarray, size: int, sigma: float = 1.5) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    image = np.zeros((size, size))
    for x, y in points:
        image += np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2))
    return np.repeat((255 * np.clip(image, 0, 1)).astype(np.uint8)[..., None], 3, axis=2)


def test_alignment_identity_and_rotated_face(tmp_path):
    identity = estimate_similarity(ARCFACE_TEMPLATE, ARCFACE_TEMPLATE)
    assert np.allclose(identity, [[1, 0, 0], [0, 1, 0]], atol=1e-9)
    angle, scale, shift = np.deg2rad(25.0), 1.3, np.array([30.0, 12.0])
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = ARCFACE_TEMPLATE.astype(np.float64) @ rotation.T + shift
    path = tmp_path / "face.png"
    Image.fromarray(blob_image(landmarks, 200)).save(path)
    aligned = AlignedImages([str(path)], landmarks[None]).load(0, 1)[0, 0].astype(np.float64)
    ys, xs = np.mgrid[0:112, 0:112]
    for x, y in ARCFACE_TEMPLATE:
        window = (np.abs(xs - x) <= 4) & (np.abs(ys - y) <= 4)
        weight = aligned * window
        centre = np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()
        assert np.linalg.norm(centre - [x, y]) < 1.0


def test_resume_recomputes_only_missing_shards(tmp_path):
    write_bin(tmp_path / "s.bin", 20, seed=4)
    payloads, _ = read_bin(str(tmp_path / "s.bin"))
    source, model, cache = EncodedImages(payloads, "s.bin"), tiny_model(), tmp_path / "cache"
    first = extract_features(model, source, "cpu", 4, cache_dir=cache, shard_size=8, progress=False)
    assert last_run["computed_shards"] == 5 and len(list(cache.glob("feats_*.npy"))) == 5
    again = extract_features(model, source, "cpu", 4, cache_dir=cache, shard_size=8, progress=False)
    assert last_run["computed_shards"] == 0 and torch.equal(first, again)
    (cache / "feats_000000016-000000024.npy").unlink()
    resumed = extract_features(model, source, "cpu", 4, cache_dir=cache, shard_size=8, progress=False)
    assert last_run["computed_shards"] == 1 and torch.equal(first, resumed)
    with torch.no_grad():
        images = torch.from_numpy(source.load(0, 40)).float().div(255).sub(0.5).div(0.5)
        expected = model(images) + model(images.flip(3))
    assert torch.allclose(first, expected, atol=1e-5)


@pytest.mark.dist
def test_two_ranks_equal_one_rank_and_resume(tmp_path):
    write_bin(tmp_path / "s.bin", 20, seed=4)
    ijb = write_ijb(tmp_path / "IJBC", subjects=6, templates_per_subject=3)
    tinyface = write_tinyface(tmp_path, matches=("1_1", "2_1", "2_2", "2_4"),
                              distractors=tuple(map(str, range(900, 912))))
    single = evaluate_model(tiny_model(), "cpu", [str(tmp_path / "s.bin")], [(str(ijb), "IJBC")],
                            tmp_path / "one", batch_size=4, shard_size=8, tinyface=tinyface)
    assert single["tinyface"]["TinyFace"]["distractors"] == 12
    run_torchrun(REPO / "tests/workers/worker_eval_shards.py", tmp_path / "two", tmp_path / "s.bin",
                 ijb, tinyface, nproc=2, timeout=240)
    report = json.loads((tmp_path / "two" / "worker.json").read_text())
    assert report["world"] == 2
    assert_results_close(report["results"], to_jsonable(single))
    assert sum(report["computed"]) == 1  # only the deleted shard was recomputed
    payloads, _ = read_bin(str(tmp_path / "s.bin"))
    one_rank = extract_features(tiny_model(), EncodedImages(payloads, "s.bin"), "cpu", 4,
                                shard_size=8, progress=False)
    assert np.allclose(np.load(tmp_path / "two" / "feats.npy"), one_rank.numpy(), atol=1e-6)
    ijb_shards = sorted((tmp_path / "two" / "features" / "IJBC").glob("feats_*.npy"))
    assert len(ijb_shards) > 2  # the IJB images were spread over both ranks' shards
    assert len(list((tmp_path / "two" / "features" / "TinyFace").glob("feats_*.npy"))) == 3
