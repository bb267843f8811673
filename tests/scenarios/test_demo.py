"""`make demo` in its reduced form (``--quick``): every model learns (its accuracy interval is
clearly above chance), the teacher is above the student trained without distillation beyond
the noise, and a second run reuses everything."""
from __future__ import annotations

import re
import sys

import pytest

from conftest import REPO, background_run, torchrun_env

MODELS = ["teacher", "none", "iled", "rpsd", "unified"]
CHANCE = 50.0  # verification pairs are half genuine, half impostor


def run_demo(out):
    return background_run([sys.executable, "tools/demo.py", "--quick", "--out", str(out)],
                          cwd=REPO, env=torchrun_env(), timeout=2400)


FIGURES = ("roc_IJBS.png", "cosine.png", "grad_share.png", "loss_terms.png")


def quick_demo_twice(root):
    """The quick demo into ``root/demo``, then again (the background job of the test): the
    two processes, and the report and the figures' sizes as the first one left them."""
    out = root / "demo"
    first = run_demo(out)
    if first.returncode != 0:
        return out, first, None, None, None
    report = (out / "study.md").read_text()
    sizes = {figure: (out / figure).stat().st_size for figure in FIGURES}
    return out, first, report, sizes, run_demo(out)


def table(report: str, header_start: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return header, rows


def numbers(cell: str) -> list[float]:
    return [float(v) for v in re.findall(r"[-+]?\d+\.\d+", cell)]


@pytest.mark.slow
@pytest.mark.background(job=quick_demo_twice)
def test_quick_demo_learns_and_reuses(background):
    out, first, report, sizes, second = background
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    header, rows = table(report, "| model | seeds |")
    assert list(rows) == MODELS
    assert header[:5] == ["model", "seeds", "synth_cfp acc", "synth_lfw acc", "mean acc"]
    for name, cells in rows.items():
        value, low, high = numbers(cells[header.index("mean acc")])
        assert low <= value <= high and high - low < 10, (name, cells)
        # learning: the whole 95 % interval of the pooled accuracy is well above chance
        assert low > CHANCE + 10, (name, cells)
    diff_header, diffs = table(report, "| model | paired seeds |")
    assert list(diffs) == ["teacher", "iled", "rpsd", "unified"]
    diff, low, high = numbers(diffs["teacher"][diff_header.index("mean acc")])
    assert low > 0 and low <= diff <= high, diffs["teacher"]  # the teacher is stronger
    for figure in FIGURES:
        assert sizes[figure] > 5_000, figure
    assert "| model | seeds |" in first.stdout  # the tables are printed

    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count(") reusing ") == 5 and ") training " not in second.stdout
    assert table((out / "study.md").read_text(), "| model | seeds |")[1] == rows
