"""Hand-made evaluation inputs for the eval tests: `.bin` files, an IJB-style release, a
TinyFace-style test set, a tiny model."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def encode(image_hwc: np.ndarray, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    options = {"quality": 95} if fmt == "JPEG" else {}
    Image.fromarray(image_hwc).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def face_images(count: int, size: int, seed: int) -> np.ndarray:
    """Smooth random RGB images (uint8 [count, size, size, 3]): JPEG-friendly, distinct."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(count, 8, 8, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.BILINEAR))
                     for c in coarse])


def write_bin(path: Path, pairs: int, seed: int = 0, fmt: str = "JPEG", size: int = 112,
              protocol: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A `.bin` of ``pairs`` pairs; same pairs share the base image (plus noise)."""
    rng = np.random.default_rng(seed)
    base = face_images(2 * pairs, size, seed)
    issame = rng.random(pairs) < 0.5
    images = base.copy()
    images[1::2][issame] = np.clip(base[0::2][issame].astype(int)
                                   + rng.integers(-8, 9, base[0::2][issame].shape), 0, 255)
    bins = [encode(img, fmt) for img in images]
    with open(path, "wb") as handle:
        pickle.dump((bins, issame.tolist()), handle, protocol=protocol)
    return images, issame


def tiny_model(dim: int = 8, seed: int = 0) -> torch.nn.Module:
    """A small deterministic embedding network for 112×112 inputs."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 8, stride=8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(24, dim)).eval()


def write_ijb(root: Path, name: str = "IJBC", subjects: int = 6, templates_per_subject: int = 3,
              seed: int = 0) -> Path:
    """An IJB-style release under ``root`` (loose_crop/, meta/) with 1:1 pairs and 1:N lists."""
    rng = np.random.default_rng(seed)
    lower = name.lower()
    (root / "loose_crop").mkdir(parents=True, exist_ok=True)
    (root / "meta").mkdir(exist_ok=True)
    faces = face_images(subjects, 96, seed)
    tid_lines, lmk_lines, template_subject = [], [], {}
    template, media, image = 100, 500, 0
    for subject in range(subjects):
        for _ in range(templates_per_subject):
            template += 1
            template_subject[template] = subject
            for _ in range(int(rng.integers(1, 3))):
                media += 1
                for _ in range(int(rng.integers(1, 3))):
                    image += 1
                    img = np.clip(faces[subject].astype(int) + rng.integers(-10, 11, faces[subject].shape),
                                  0, 255).astype(np.uint8)
                    file = f"{image}.jpg"
                    (root / "loose_crop" / file).write_bytes(encode(img))
                    lmk = np.array([[30, 40], [66, 40], [48, 58], [34, 76], [62, 76]], float)
                    lmk += rng.normal(0, 1.0, lmk.shape)
                    tid_lines.append(f"{file} {template} {media}")
                    lmk_lines.append(f"{file} " + " ".join(f"{v:.3f}" for v in lmk.ravel())
                                     + f" {rng.uniform(0.5, 1.0):.4f}")
    (root / "meta" / f"{lower}_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
    (root / "meta" / f"{lower}_name_5pts_score.txt").write_text("\n".join(lmk_lines) + "\n")
    ids = sorted(template_subject)
    pairs = [f"{a} {b} {int(template_subject[a] == template_subject[b])}"
             for i, a in enumerate(ids) for b in ids[i + 1:]]
    (root / "meta" / f"{lower}_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    first = {s: min(t for t in ids if template_subject[t] == s) for s in range(subjects)}
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
    for gallery, members in (("G1", range(0, subjects, 2)), ("G2", range(1, subjects, 2))):
        (root / "meta" / f"{lower}_1N_gallery_{gallery}.csv").write_text(
            header + "".join(f"{first[s]},{s},x.jpg\n" for s in members))
    probes = [t for t in ids if first[template_subject[t]] != t]
    (root / "meta" / f"{lower}_1N_probe_mixed.csv").write_text(
        header + "".join(f"{t},{template_subject[t]},x.jpg\n" for t in probes))
    return root


def write_tinyface(root: Path, probes=("1_3", "2_3"), matches=("1_1", "2_1", "2_2"),
                   distractors=("900", "901")) -> Path:
    """A small TinyFace test set ``root/tinyface/Testing_Set`` of 20×16 JPEGs."""
    testing_set = root / "tinyface" / "Testing_Set"
    images = iter(face_images(len(probes) + len(matches) + len(distractors), 20, seed=3))
    for folder, names in (("Probe", probes), ("Gallery_Match", matches),
                          ("Gallery_Distractor", distractors)):
        (testing_set / folder).mkdir(parents=True)
        for name in names:
            (testing_set / folder / f"{name}.jpg").write_bytes(encode(next(images)[:, 2:18]))
    return testing_set


def assert_results_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_results_close(a[key], b[key])
        else:
            assert a[key] == pytest.approx(b[key], abs=1e-9), key
