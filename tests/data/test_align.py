"""Five-point similarity alignment (METHOD V2): estimator, warp and end-to-end alignment, and
tools/align_faces.py on the synthetic IJB-style release."""
from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest
import simplejpeg

from conftest import REPO
from fr_distill.data.align import (ARCFACE_TEMPLATE, align_face, alignment_matrix,
                                   estimate_similarity, template_for_size, warp_affine)


def similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx],
                     [scale * np.sin(a), scale * np.cos(a), ty]])


def apply(matrix: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ matrix[:, :2].T + matrix[:, 2]


def complex_least_squares(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Independent 2-D solution: dst - mean = a·(src - mean) with a complex (rotation+scale)."""
    zs = src[:, 0] + 1j * src[:, 1]
    zd = dst[:, 0] + 1j * dst[:, 1]
    zs_c, zd_c = zs - zs.mean(), zd - zd.mean()
    a = np.sum(np.conj(zs_c) * zd_c) / np.sum(np.abs(zs_c) ** 2)
    b = zd.mean() - a * zs.mean()
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def blob_face(size: int = 112) -> np.ndarray:
    """A smooth face-like image: a skin ellipse with dark blobs at the five template points."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    img = np.full((size, size, 3), 40.0)
    inside = ((xs - 56) / 42) ** 2 + ((ys - 62) / 52) ** 2
    skin = np.clip(1.5 - inside, 0, 1)[..., None] * np.array([200.0, 160.0, 130.0])
    img = np.maximum(img, skin)
    for x, y in ARCFACE_TEMPLATE:
        blob = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 4.0 ** 2))[..., None]
        img = img * (1 - 0.8 * blob) + 20 * blob
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def test_template_onto_itself_is_identity():
    matrix = estimate_similarity(ARCFACE_TEMPLATE, ARCFACE_TEMPLATE)
    np.testing.assert_allclose(matrix, [[1, 0, 0], [0, 1, 0]], atol=1e-9)
    np.testing.assert_allclose(alignment_matrix(ARCFACE_TEMPLATE), [[1, 0, 0], [0, 1, 0]],
                               atol=1e-9)


def test_exact_similarity_is_recovered():
    truth = similarity(-33.0, 1.7, 21.5, -8.25)
    src = ARCFACE_TEMPLATE.astype(np.float64)
    np.testing.assert_allclose(estimate_similarity(src, apply(truth, src)), truth, atol=1e-9)


def test_noisy_points_match_independent_least_squares():
    rng = np.random.default_rng(3)
    src = rng.uniform(0, 200, size=(7, 2))
    dst = apply(similarity(71.0, 0.6, 5.0, 40.0), src) + rng.normal(0, 3.0, size=(7, 2))
    ours = estimate_similarity(src, dst)
    np.testing.assert_allclose(ours, complex_least_squares(src, dst), atol=1e-9)
    # no reflection even when the points are mirrored
    mirrored = dst * np.array([-1.0, 1.0])
    rot = estimate_similarity(src, mirrored)[:, :2]
    assert np.linalg.det(rot) > 0


def test_warp_integer_and_half_pixel_shifts():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    shifted = warp_affine(img, [[1, 0, 3], [0, 1, 2]], 20, 30)
    np.testing.assert_array_equal(shifted[2:, 3:], img[:-2, :-3])
    assert not shifted[:2].any() and not shifted[:, :3].any()  # outside reads as black
    half = warp_affine(img, [[1, 0, -0.5], [0, 1, 0]], 20, 30)
    expected = (img[:, :-1].astype(np.float64) + img[:, 1:]) / 2
    assert np.abs(half[:, :-1].astype(np.float64) - expected).max() <= 0.5 + 1e-9


def test_rotated_scaled_face_is_aligned_back():
    face = blob_face()
    truth = similarity(25.0, 1.2, 0.0, 0.0)  # template crop -> loose 200×200 image,
    truth[:, 2] = 100.0 - truth[:, :2] @ [56.0, 56.0]  # crop centre at the loose centre
    loose = warp_affine(face, truth, 200, 200)
    landmarks = apply(truth, ARCFACE_TEMPLATE.astype(np.float64))
    matrix = alignment_matrix(landmarks)
    back = apply(matrix, landmarks)
    assert np.abs(back - ARCFACE_TEMPLATE).max() < 1.0
    aligned = align_face(loose, landmarks)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    diff = np.abs(aligned.astype(np.int16) - face.astype(np.int16))
    assert diff[8:-8, 8:-8].mean() < 2.0
    assert diff[8:-8, 8:-8].max() < 40


def test_template_for_other_sizes():
    np.testing.assert_allclose(template_for_size(224), ARCFACE_TEMPLATE * 2, rtol=1e-6)
    t128 = template_for_size(128)
    np.testing.assert_allclose(t128[:, 0], ARCFACE_TEMPLATE[:, 0] + 8, rtol=1e-6)
    crop = align_face(blob_face(), ARCFACE_TEMPLATE, size=224)
    assert crop.shape == (224, 224, 3)


@pytest.mark.parametrize("landmarks, message", [
    (np.zeros((4, 2)), "expected 5×2"),
    (np.full((5, 2), np.nan), "NaN"),
    (np.ones((5, 2)), "same point"),
])
def test_bad_landmarks_are_refused(landmarks, message):
    with pytest.raises(ValueError, match=message):
        align_face(blob_face(), landmarks)


def test_bad_image_is_refused():
    with pytest.raises(ValueError, match="uint8 H×W×3"):
        align_face(np.zeros((112, 112), np.uint8), ARCFACE_TEMPLATE)


def write_loose_folder(root, entries):
    """Loose PNG crops of the blob face under known similarities; returns landmark lines."""
    from PIL import Image

    lines = []
    for name, angle, scale, faceness in entries:
        truth = similarity(angle, scale, 0.0, 0.0)
        truth[:, 2] = 80.0 - truth[:, :2] @ [56.0, 56.0]
        Image.fromarray(warp_affine(blob_face(), truth, 160, 160)).save(root / name)
        pts = apply(truth, ARCFACE_TEMPLATE.astype(np.float64))
        lines.append(f"{name} {' '.join(f'{v:.3f}' for v in pts.ravel())} {faceness}")
    return lines


def test_align_folder_aligns_every_listed_image(tmp_path):
    from PIL import Image

    from fr_distill.data.align import align_folder

    (tmp_path / "loose").mkdir()
    lines = write_loose_folder(tmp_path / "loose", [("a.png", 20.0, 1.1, 0.9),
                                                    ("b.png", -35.0, 0.9, 0.2)])
    (tmp_path / "lm.txt").write_text("\n".join(lines) + "\n")
    count = align_folder(tmp_path / "loose", tmp_path / "lm.txt", tmp_path / "out",
                         min_faceness=0.5, progress=False)
    assert count == 1 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]
    crop = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    diff = np.abs(crop.astype(np.int16) - blob_face().astype(np.int16))[8:-8, 8:-8]
    assert crop.shape == (112, 112, 3) and diff.mean() < 2.0


@pytest.mark.parametrize("line, message", [
    ("a.png 1 2 3", r"lm.txt:2: expected 'img x1 y1 \.\.\. x5 y5 \[faceness\]'"),
    ("a.png 1 2 3 4 5 6 7 x 9 10 1.0", r"lm.txt:2: non-numeric landmark value"),
    ("missing.png 1 2 3 4 5 6 7 8 9 10 1.0", r"lm.txt: image 'missing.png' not found"),
])
def test_align_folder_bad_landmark_files(tmp_path, line, message):
    from fr_distill.data import DataError
    from fr_distill.data.align import align_folder

    (tmp_path / "loose").mkdir()
    good = write_loose_folder(tmp_path / "loose", [("a.png", 0.0, 1.0, 1.0)])
    (tmp_path / "lm.txt").write_text(good[0] + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        align_folder(tmp_path / "loose", tmp_path / "lm.txt", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # refused before any work


def decode(data: bytes) -> np.ndarray:
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


def read_table(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()]


def test_align_faces_tool_on_the_ijb_release(synthetic_data, tmp_path):
    root = synthetic_data / "ijb" / "IJBS"
    main = runpy.run_path(str(REPO / "tools" / "align_faces.py"))["main"]
    landmarks = root / "meta" / "ijbs_name_5pts_score.txt"
    assert main(["--images", str(root / "loose_crop"), "--landmarks", str(landmarks),
                 "--out", str(tmp_path)]) == 0
    names = [r[0] for r in read_table(landmarks)]
    crops = [decode((tmp_path / n).read_bytes()) for n in names]
    assert all(c.shape == (112, 112, 3) for c in crops)
    # aligned crops of one template agree more with each other than with other templates
    tids = [int(r[1]) for r in read_table(root / "meta" / "ijbs_face_tid_mid.txt")]
    feats = np.stack([c[30:100, 24:88].astype(np.float32).ravel() for c in crops])
    feats -= feats.mean(axis=1, keepdims=True)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    sims = feats @ feats.T
    tids = np.array(tids)
    same = (tids[:, None] == tids[None]) & ~np.eye(len(tids), dtype=bool)
    assert sims[same].mean() > sims[tids[:, None] != tids[None]].mean() + 0.1
