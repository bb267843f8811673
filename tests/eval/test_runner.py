"""Evaluation runs on the synthetic `.bin` and IJB-style sets end to end, with the results
file, the ROC figure and the scalars."""
from __future__ import annotations

from pathlib import Path

import pytest

from fr_distill.eval.runner import evaluate_model
from tests.eval_data import tiny_model


class RecordingWriter:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)

    def flush(self):
        pass


@pytest.mark.slow
def test_synthetic_sets_end_to_end(synthetic_data, tmp_path):
    bins = sorted(str(p) for p in Path(synthetic_data).glob("*.bin"))
    ijb_root = Path(synthetic_data) / "ijb" / "IJBS"
    writer = RecordingWriter()
    results = evaluate_model(tiny_model(dim=16), "cpu", bins, [(str(ijb_root), "IJBS")],
                             tmp_path / "out", batch_size=64, writer=writer, step=7)
    assert len(results["bin"]) == len(bins) >= 1
    for metrics in results["bin"].values():
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    ijb = results["ijb"]["IJBS"]
    for method in ("nearest", "interpolated"):
        assert len(ijb["verification"][method]) == 6
        assert all(0.0 <= v <= 1.0 for v in ijb["verification"][method].values())
    assert 0.0 <= ijb["identification"]["rank1"] <= ijb["identification"]["rank10"] <= 1.0
    assert (tmp_path / "out" / "results.json").exists() and (tmp_path / "out" / "roc_IJBS.png").exists()
    assert writer.scalars["eval/IJBS/tar_nearest@1e-05"][1] == 7
    assert any(tag.endswith("/accuracy_mean") for tag in writer.scalars)
