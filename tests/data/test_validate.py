"""Full validation of training data (``tools/validate_data.py``): every image decoded, each
problem listed, several sets at once."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from fr_distill.data.validate import validate_dataset
from .conftest import jpeg_bytes


def test_validate_data_decodes_everything_and_exits_nonzero(jpeg_folder, tmp_path):
    good = validate_dataset(str(jpeg_folder), progress=False)
    assert good.ok and good.class_counts == {f"id{c:03d}": 6 for c in range(4)}
    # headers fine (SOF and EOI present) but no scan data: only a full decode finds it
    header = jpeg_bytes()
    (jpeg_folder / "id000" / "noscan.jpg").write_bytes(header[:header.index(b"\xff\xda")] + b"\xff\xd9")
    (jpeg_folder / "id001" / "junk.jpg").write_bytes(b"junk")
    report = validate_dataset(str(jpeg_folder), progress=False)
    assert report.problems[0] == f"{jpeg_folder / 'id001' / 'junk.jpg'}: not a JPEG or PNG image"
    assert report.problems[1].startswith(f"{jpeg_folder / 'id000' / 'noscan.jpg'}: cannot decode image")
    assert report.class_counts["id000"] == 6 and report.class_counts["id001"] == 6
    proc = subprocess.run([sys.executable, "tools/validate_data.py", str(jpeg_folder),
                           "--no-progress", "--counts", str(tmp_path / "c.csv")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and "BAD " + str(jpeg_folder / "id001" / "junk.jpg") in proc.stdout
    assert "2 problem(s) found" in proc.stdout
    assert (tmp_path / "c.csv").read_text().splitlines()[1] == "id000,6"


@pytest.mark.timeout(180)
def test_validate_data_takes_several_sets(two_sets):
    a, b = two_sets
    proc = subprocess.run([sys.executable, "tools/validate_data.py", a, b, "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"{a}, {b}/train.rec (folder+recordio): 22 images in 5 classes" in proc.stdout
    assert "  0:id002: 4\n  1:0: 5\n  1:1: 5\n" in proc.stdout
