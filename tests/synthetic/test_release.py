"""The synthetic data set's files: the training folder and its RecordIO pair, the `.bin` sets
in InsightFace's structure, the IJB-style release (consistent meta, landmarks against the
alignment ground truth)."""
from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np

from fr_distill.data import RecordIOReader
from fr_distill.data.align import ARCFACE_TEMPLATE, alignment_matrix
from fr_distill.synthetic.release import CSV_COLUMNS
from .conftest import decode, manifest


def test_training_folder_and_recordio_layout(synthetic_data):
    m = manifest(synthetic_data)
    n, k = m["parameters"]["num_identities"], m["parameters"]["images_per_identity"]
    assert m["complete"] and m["counts"]["train_images"] == n * k
    folders = sorted((synthetic_data / "train").iterdir())
    assert [f.name for f in folders] == [f"{i:05d}" for i in range(n)]
    files = [sorted(f.iterdir()) for f in folders]
    assert all([p.name for p in fs] == [f"{j:04d}.jpg" for j in range(k)] for fs in files)
    with RecordIOReader(synthetic_data / "train.rec", synthetic_data / "train.idx") as rec:
        assert len(rec) == n * k
        header, _ = rec.read_key(0)
        assert header.labels == (n * k + 1, n * k + 1 + n)
        for i in range(n * k):
            label, data = rec.read(i)
            identity, image = divmod(i, k)
            assert label == identity
            assert data == files[identity][image].read_bytes()
        for identity in range(n):  # InsightFace identity records: (first id, end id)
            record, payload = rec.read_key(n * k + 1 + identity)
            assert record.labels == (1 + identity * k, 1 + (identity + 1) * k) and payload == b""
    for path in (files[0][0], files[-1][-1]):
        img = decode(path.read_bytes())
        assert img.shape == (112, 112, 3) and img.dtype == np.uint8


def test_bin_files_have_insightface_structure(synthetic_data):
    from fr_distill.eval.verification import load_bin

    pairs = manifest(synthetic_data)["parameters"]["bin_pairs"]
    for name in ("synth_lfw", "synth_cfp"):
        path = synthetic_data / f"{name}.bin"
        raw = path.read_bytes()
        assert raw[:2] == b"\x80\x04"  # pickle protocol 4
        bins, issame = pickle.loads(raw)
        assert isinstance(bins, list) and isinstance(issame, list)
        assert len(bins) == 2 * pairs and len(issame) == pairs
        assert all(type(b) is bytes for b in bins) and all(type(s) is bool for s in issame)
        assert issame == [k % 2 == 0 for k in range(pairs)]
        for data in bins[:6]:
            assert decode(data).shape == (112, 112, 3)
        images, same = load_bin(path)
        assert tuple(images.shape) == (2 * pairs, 3, 112, 112)
        assert list(np.asarray(same)) == issame


def read_table(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()]


def test_ijb_release_meta_is_consistent(synthetic_data):
    from fr_distill.eval.ijb_meta import load_ijb_meta

    root = synthetic_data / "ijb" / "IJBS"
    meta = root / "meta"
    tid_mid = read_table(meta / "ijbs_face_tid_mid.txt")
    landmarks = read_table(meta / "ijbs_name_5pts_score.txt")
    assert [r[0] for r in tid_mid] == [r[0] for r in landmarks]
    assert all(len(r) == 3 for r in tid_mid) and all(len(r) == 12 for r in landmarks)
    for name, *_ in tid_mid:
        with open(root / "loose_crop" / name, "rb") as f:
            h, w = decode(f.read()).shape[:2]
        assert h == w and 150 <= h <= 200
    faceness = np.array([float(r[11]) for r in landmarks])
    assert faceness.min() >= 0.3 and faceness.max() <= 1.0 and faceness.std() > 0
    template_of = {}
    for name, tid, mid in tid_mid:
        template_of.setdefault(int(tid), set()).add(int(mid))
    subject = {}
    csv_sets = {}
    for part in ("gallery_G1", "gallery_G2", "probe_mixed"):
        with open(meta / f"ijbs_1N_{part}.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert tuple(rows[0]) == CSV_COLUMNS
        csv_sets[part] = {int(r[0]) for r in rows[1:]}
        for r in rows[1:]:
            assert subject.setdefault(int(r[0]), int(r[1])) == int(r[1])
            assert (root / "loose_crop" / r[2]).is_file() and int(r[3]) in template_of[int(r[0])]
    g1, g2, probes = csv_sets["gallery_G1"], csv_sets["gallery_G2"], csv_sets["probe_mixed"]
    assert not (g1 & g2) and not ((g1 | g2) & probes) and set(template_of) == g1 | g2 | probes
    assert {subject[t] for t in probes} == {subject[t] for t in g1 | g2}
    pairs = read_table(meta / "ijbs_template_pair_label.txt")
    labels = [int(label) for _, _, label in pairs]
    assert all(int(label) == int(subject[int(a)] == subject[int(b)]) for a, b, label in pairs)
    assert 0 < sum(labels) < len(labels)
    parsed = load_ijb_meta(root, "IJBS")  # the evaluation's own reader reads the same release
    assert sorted(parsed.labels.tolist()) == sorted(labels)
    assert set(parsed.templates.tolist()) == set(template_of)
    assert len(parsed.image_paths) == len(parsed.landmarks) == len(parsed.faceness) > 0
    assert all(Path(p).is_file() for p in parsed.image_paths)


def test_ijb_landmarks_align_onto_the_ground_truth_within_a_pixel(synthetic_data):
    meta = synthetic_data / "ijb" / "IJBS" / "meta"
    landmarks = read_table(meta / "ijbs_name_5pts_score.txt")
    truth = {r[0]: np.array(r[1:], dtype=float).reshape(2, 3)
             for r in read_table(meta / "ijbs_align_truth.txt")}
    worst_truth, worst_template = 0.0, 0.0
    for name, *values in landmarks:
        pts = np.array(values[:10], dtype=float).reshape(5, 2)
        estimated = alignment_matrix(pts)
        mapped = pts @ estimated[:, :2].T + estimated[:, 2]
        expected = pts @ truth[name][:, :2].T + truth[name][:, 2]
        worst_truth = max(worst_truth, np.abs(mapped - expected).max())
        worst_template = max(worst_template, np.abs(mapped - ARCFACE_TEMPLATE).max())
    assert worst_truth < 1.0
    assert worst_template < 8.0  # faces differ from the template, but not wildly


def test_synthetic_recordio_matches_its_folder(synthetic_data):
    """The generator's InsightFace pair (header + identity records) against its image folder."""
    from collections import Counter

    from fr_distill.config import DataConfig
    from fr_distill.data import preflight

    folder = preflight(DataConfig(train=str(synthetic_data / "train")))
    rec = preflight(DataConfig(train=str(synthetic_data / "train.rec")))
    assert (rec.format, rec.num_samples, rec.num_classes) == ("recordio", 24 * 8, 24)
    assert (folder.num_samples, folder.num_classes) == (rec.num_samples, rec.num_classes)
    reader = RecordIOReader(synthetic_data / "train.rec", synthetic_data / "train.idx")
    assert reader.header == (193.0, 217.0)  # images 1..192, identity records 193..216
    from_rec = Counter(reader.read(int(i)) for i in rec.samples)
    from_folder = Counter((int(label), (synthetic_data / "train" / path.decode()).read_bytes())
                          for label, path in zip(folder.labels, folder.samples))
    assert from_rec == from_folder
