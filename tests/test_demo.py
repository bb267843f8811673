"""`make demo` in its reduced form (``--quick``): every step runs, the report has a row per
model with numbers in range, and a second run reuses what the first built."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO, torchrun_env

MODELS = ["teacher", "none", "iled", "rpsd", "unified"]


def run_demo(out):
    return subprocess.run([sys.executable, "tools/demo.py", "--quick", "--out", str(out)], cwd=REPO,
                          env=torchrun_env(), capture_output=True, text=True, timeout=900)


def report_rows(report: str) -> dict[str, list[float]]:
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in MODELS:
            rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


@pytest.mark.slow
def test_quick_demo_end_to_end_and_reuse(tmp_path):
    out = tmp_path / "demo"
    first = run_demo(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = (out / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| model"))
    assert header == ("| model | synth_cfp acc | synth_lfw acc | TAR@FAR=1e-4 | TAR@FAR=1e-3 "
                      "| rank-1 |")
    rows = report_rows(report)
    assert list(rows) == MODELS
    for name, values in rows.items():
        assert len(values) == 5 and all(0.0 <= v <= 100.0 for v in values), (name, values)
        assert 30.0 <= values[0] <= 100.0 and 30.0 <= values[1] <= 100.0, (name, values)
    assert (out / "roc_ijb.png").stat().st_size > 10_000
    for name in MODELS:
        assert (out / "eval" / name / "results.json").is_file()
    assert len(re.findall(r"checkpoint .*step_\d+\.pt", first.stdout + first.stderr)) >= 5

    second = run_demo(out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("reusing") == 5
    assert "training" not in second.stdout
    assert report_rows((out / "report.md").read_text()) == rows
