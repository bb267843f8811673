"""``generate``: the same bytes for any worker count, disjoint identity pools, reuse and
regeneration, refused directories and arguments, ``tools/make_synthetic.py``, and a
verification ``.bin`` written alone."""
from __future__ import annotations

import os
import runpy
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from fr_distill.data import DataError
from fr_distill.synthetic import generate
from fr_distill.synthetic.build import identity_pool, write_verification_bin
from .conftest import TOOL_ARGS, manifest

TINY = dict(bin_identities=4, bin_pairs=12, ijb_subjects=3, ijb_probe_templates=1,
            ijb_max_media=2, ijb_max_images=2)


def tree_bytes(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


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


def test_write_verification_bin_equals_generates_synth_lfw(tmp_path):
    args = dict(seed=3, bin_identities=8, bin_pairs=12)
    generate(tmp_path / "full", num_identities=2, images_per_identity=1, ijb_subjects=2,
             workers=1, **args)
    alone = write_verification_bin(tmp_path / "synth_lfw.bin", 12, seed=3, bin_identities=8,
                                   workers=1)
    assert alone.read_bytes() == (tmp_path / "full" / "synth_lfw.bin").read_bytes()
