"""Loose-crop alignment with DALI on the CPU against the numpy alignment."""
from __future__ import annotations

import numpy as np

from fr_distill.eval.dali_align import DaliAlignedImages
from fr_distill.eval.ijb_meta import load_ijb_meta
from fr_distill.eval.extract import AlignedImages
from tests.eval_data import write_ijb


def test_dali_cpu_alignment_matches_numpy(tmp_path):
    root = write_ijb(tmp_path / "IJBC", subjects=2, templates_per_subject=2)
    meta = load_ijb_meta(root, "IJBC")
    count = min(6, len(meta.image_paths))
    reference = AlignedImages(meta.image_paths, meta.landmarks).load(0, count).astype(int)
    dali = DaliAlignedImages(meta.image_paths, meta.landmarks, device="cpu").load(0, count)
    assert dali.shape == reference.shape and dali.dtype == np.uint8
    difference = np.abs(dali.astype(int) - reference)
    assert difference.max() <= 2 and difference.mean() < 0.1
