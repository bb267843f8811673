"""The synthetic face data set: determinism, layouts and formats, disjoint splits, alignment
ground truth, reuse, that identities are learnable (same > family-mate > stranger), and the
ONNX teachers of both model-zoo input conventions."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import pickle
import runpy
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch

from fr_distill.data import DataError, RecordIOReader
from fr_distill.data.align import ARCFACE_TEMPLATE, alignment_matrix
from fr_distill.synthetic import generate
from fr_distill.synthetic.build import identity_pool
from fr_distill.synthetic.release import CSV_COLUMNS

REPO = Path(__file__).resolve().parents[2]
TINY = dict(bin_identities=4, bin_pairs=12, ijb_subjects=3, ijb_probe_templates=1,
            ijb_max_media=2, ijb_max_images=2)
TOOL_ARGS = ["--identities", "3", "--images", "2", "--bin-identities", "4", "--bin-pairs", "20",
             "--ijb-subjects", "2", "--ijb-max-media", "1", "--workers", "1"]
TEACHER_ARCH = ("iresnet18", 32, 0.125)  # the conftest teacher_file's architecture


def tree_bytes(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def decode(data: bytes) -> np.ndarray:
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


# --------------------------------------------------------------------------------------
def test_same_seed_same_bytes_for_any_worker_count_and_other_seed_differs(tmp_path):
    a = generate(tmp_path / "a", 6, 3, seed=5, workers=1, **TINY)
    b = generate(tmp_path / "b", 6, 3, seed=5, workers=2, **TINY)
    c = generate(tmp_path / "c", 6, 3, seed=6, workers=1, **TINY)
    files_a, files_b, files_c = (tree_bytes(tmp_path / x) for x in "abc")
    assert a == b and files_a == files_b
    assert len(files_a) > 40
    jpegs = [k for k in files_a if k.endswith(".jpg") and k in files_c]
    assert len(jpegs) > 30
    assert all(files_a[k] != files_c[k] for k in jpegs)
    assert c["parameters"]["seed"] == 6


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


def test_identity_pools_are_disjoint(synthetic_data):
    p = manifest(synthetic_data)["parameters"]
    train = identity_pool(p["seed"], "train", p["num_identities"], p["family_size"])
    held_out = np.concatenate([
        identity_pool(p["seed"], "verification", p["bin_identities"], p["family_size"]),
        identity_pool(p["seed"], "ijb", p["ijb_subjects"], p["family_size"]),
        identity_pool(p["seed"], "tinyface", p["tinyface_identities"] + p["tinyface_distractors"],
                      p["family_size"])])
    distance = np.linalg.norm(train[:, None] - held_out[None], axis=2)
    within = np.linalg.norm(train[:, None] - train[None], axis=2)[~np.eye(len(train), dtype=bool)]
    assert distance.min() > 1.0  # no held-out identity is (close to) a training identity
    assert distance.min() > np.percentile(within, 1)  # no closer than training family-mates


def test_tinyface_release_layout_sizes_and_lists(synthetic_data):
    """The evaluator's reader accepts it (it checks the .mat lists against the folders);
    the counts, the low resolutions and the .mat headers (no time stamp) are as planned."""
    from fr_distill.eval.tinyface import load_tinyface

    p = manifest(synthetic_data)["parameters"]
    release = load_tinyface(synthetic_data / "tinyface")
    n, g, k = p["tinyface_identities"], p["tinyface_gallery"], p["tinyface_probes"]
    assert (release.num_probes, release.num_matches, release.num_distractors) == (
        n * k, n * g, p["tinyface_distractors"])
    assert sorted(set(release.labels.tolist())) == [-1, *range(1, n + 1)]
    low, high = p["tinyface_sizes"]
    for path in release.image_paths:
        width, height = decode(Path(path).read_bytes()).shape[1::-1]
        assert low <= height <= high and 0.75 * height - 0.5 <= width <= height
    for mat in sorted(release.testing_set.glob("*.mat")):
        assert mat.read_bytes().startswith(b"MATLAB 5.0 MAT-file, fr_distill synthetic")


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


def test_second_run_reuses_and_changed_arguments_regenerate(tmp_path):
    out = tmp_path / "data"
    first = generate(out, 5, 2, seed=1, workers=1, **TINY)
    rec = out / "train.rec"
    stamp = rec.stat().st_mtime_ns
    assert generate(out, 5, 2, seed=1, workers=1, **TINY) == first
    assert rec.stat().st_mtime_ns == stamp
    generate(out, 3, 2, seed=1, workers=1, **TINY)  # fewer identities: stale folders removed
    assert sorted(p.name for p in (out / "train").iterdir()) == ["00000", "00001", "00002"]
    assert manifest(out)["counts"]["train_images"] == 6
    (out / "train.idx").write_text("0\t0\n")  # damaged file: regenerated
    generate(out, 3, 2, seed=1, workers=1, **TINY)
    assert (out / "train.idx").stat().st_size > 10
    generate(out, 3, 2, seed=1, workers=1, ijb_name="IJBX", **TINY)  # renamed release
    assert sorted(p.name for p in (out / "ijb").iterdir()) == ["IJBX"]


def test_foreign_directory_and_bad_arguments_are_refused(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="not written by the synthetic generator"):
        generate(tmp_path, 4, 2, workers=1, **TINY)
    assert (tmp_path / "train").is_dir()
    with pytest.raises(DataError, match="num_identities=1"):
        generate(tmp_path / "x", 1, 2)
    with pytest.raises(DataError, match="ijb_crop_sizes"):
        generate(tmp_path / "x", 4, 2, ijb_crop_sizes=(100, 120))
    assert not (tmp_path / "x").exists()


def test_make_synthetic_tool(tmp_path, capsys):
    main = runpy.run_path(str(REPO / "tools" / "make_synthetic.py"))["main"]
    assert main([str(tmp_path), *TOOL_ARGS]) == 0
    assert '"train_images": 6' in capsys.readouterr().out
    assert main([str(tmp_path / "bad"), "--identities", "1"]) == 2  # bad input
    assert "num_identities=1" in capsys.readouterr().err
    assert os.path.isfile(tmp_path / "synth_cfp.bin")


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


# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_teachers(teacher_file, tmp_path_factory) -> tuple[Path, str]:
    """``tools/make_synthetic.py OUT_DIR --onnx-teachers`` on an fr_distill checkpoint holding
    the conftest teacher's weights, with a small data set (.bin sets of 20 pairs: a quick
    teacher check): (OUT_DIR, the tool's stdout)."""
    from fr_distill.config import Config, to_dict

    cfg = Config()
    cfg.model.name, cfg.model.embedding_dim, cfg.model.width = TEACHER_ARCH
    out = tmp_path_factory.mktemp("onnx_teachers")
    checkpoint = out / "checkpoint.pt"
    torch.save({"format": "fr_distill", "version": 1, "step": 1, "config": to_dict(cfg),
                "student": torch.load(teacher_file, weights_only=True)}, checkpoint)
    main = runpy.run_path(str(REPO / "tools" / "make_synthetic.py"))["main"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([str(out / "data"), *TOOL_ARGS, "--onnx-teachers", str(checkpoint)]) == 0
    return out / "data", stdout.getvalue()


def test_onnx_teachers_take_each_input_convention_and_reproduce_the_model(
        onnx_teachers, teacher_file, caplog):
    """Both written files are read with the convention they were written for (the log says
    which and why), give the source model's embeddings from pipeline-normalized images and
    its accuracy on the data set's .bin set; the raw-pixel file fed the other convention
    does not."""
    from fr_distill.eval import evaluate_bin_sets
    from fr_distill.models import load_frozen_model

    data, stdout = onnx_teachers
    root = data / "onnx_teachers"
    normalized, raw = root / "teacher_normalized.onnx", root / "teacher_raw_pixels.onnx"
    assert sorted(p.name for p in root.iterdir()) == [normalized.name, raw.name]
    assert f"onnx teacher, normalized: {normalized}\n" in stdout
    assert f"onnx teacher, raw_pixels: {raw}\n" in stdout
    source = load_frozen_model(str(teacher_file), *TEACHER_ARCH)
    with caplog.at_level(logging.INFO, logger="fr_distill"):
        teachers = {"normalized": load_frozen_model(str(normalized)),
                    "raw_pixels": load_frozen_model(str(raw))}
    assert (f"teacher {normalized}: input (pixels - 127.5) / 127.5: no Sub and Mul/Div before "
            f"the first Conv") in caplog.text
    assert (f"teacher {raw}: input (pixels - 0) / 1: the graph normalizes its input itself "
            f"(Sub, Mul before the first Conv): raw 0-255 pixels") in caplog.text
    pixels = torch.randint(0, 256, (3, 3, 112, 112), generator=torch.Generator().manual_seed(2))
    x = (pixels.float() - 127.5) / 127.5
    expected = source(x)

    def relative_error(model) -> float:
        return ((model(x) - expected).abs().max() / expected.abs().max()).item()

    assert all(relative_error(teacher) < 1e-4 for teacher in teachers.values())
    forced = load_frozen_model(str(raw), input_mean=127.5, input_std=127.5)
    assert relative_error(forced) > 0.05
    lfw = str(data / "synth_lfw.bin")
    accuracy = {name: evaluate_bin_sets(model, [lfw], "cpu")["synth_lfw"]["accuracy_mean"]
                for name, model in {"source": source, **teachers}.items()}
    assert accuracy["normalized"] == accuracy["raw_pixels"] == accuracy["source"]


def test_onnx_teachers_option_refuses_a_bad_model_before_writing(tmp_path, capsys):
    main = runpy.run_path(str(REPO / "tools" / "make_synthetic.py"))["main"]
    out, missing = tmp_path / "out", tmp_path / "absent.pt"
    assert main([str(out), *TOOL_ARGS, "--onnx-teachers", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: model file not found: {missing}\n"
    script = tmp_path / "script.pt"
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(3, 4))
    torch.jit.save(torch.jit.script(model), script)
    assert main([str(out), *TOOL_ARGS, "--onnx-teachers", str(script)]) == 2
    assert capsys.readouterr().err == (f"error: {script}: a torchscript model cannot be exported "
                                       "to ONNX again; give an fr_distill checkpoint or a state "
                                       "dict\n")
    assert not out.exists()
