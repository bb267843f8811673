"""Reading an IJB release's meta files: each error names the file and the line (and the
field)."""
from __future__ import annotations

import pytest

from fr_distill.eval import EvalDataError
from fr_distill.eval.ijb_meta import load_ijb_meta
from tests.eval_data import write_ijb


def test_meta_errors_name_file_and_line(tmp_path):
    root = write_ijb(tmp_path / "IJBC", subjects=2, templates_per_subject=2)
    meta = load_ijb_meta(root, "IJBC")
    assert len(meta.image_paths) == len(meta.templates) and meta.probes is not None
    meta_dir = root / "meta"

    lmk = meta_dir / "ijbc_name_5pts_score.txt"
    lines = lmk.read_text().splitlines()
    lmk.write_text("\n".join(lines[:1] + [lines[1].rsplit(" ", 2)[0]] + lines[2:]) + "\n")
    with pytest.raises(EvalDataError, match=r"ijbc_name_5pts_score\.txt:2: expected"):
        load_ijb_meta(root, "IJBC")
    lmk.write_text("\n".join(lines) + "\n")

    pairs = meta_dir / "ijbc_template_pair_label.txt"
    text = pairs.read_text()
    pairs.write_text(text + "101 999 0\n")
    with pytest.raises(EvalDataError, match=rf"ijbc_template_pair_label\.txt:{text.count(chr(10)) + 1}: "
                                            r"t2 template 999 is not in the template table"):
        load_ijb_meta(root, "IJBC")
    pairs.write_text(text + "101 x 0\n")
    with pytest.raises(EvalDataError, match=r"pair_label\.txt:\d+: expected 't1 t2 label'"):
        load_ijb_meta(root, "IJBC")
    pairs.write_text(text)

    first_image = meta.image_paths[0]
    (root / "loose_crop" / first_image.rsplit("/", 1)[1]).unlink()
    with pytest.raises(EvalDataError, match=r"ijbc_face_tid_mid\.txt:1: image 1\.jpg not found"):
        load_ijb_meta(root, "IJBC")

    (meta_dir / "ijbc_face_tid_mid.txt").unlink()
    with pytest.raises(EvalDataError, match=r"ijbc_face_tid_mid\.txt: meta file not found"):
        load_ijb_meta(root, "IJBC")


def test_a_bad_field_late_in_a_long_row_is_named(tmp_path):
    """The faceness score (field 12, the last of a long row) is not a number:
    the message names the field and its value."""
    root = write_ijb(tmp_path / "IJBC", subjects=2, templates_per_subject=2)
    lmk = root / "meta" / "ijbc_name_5pts_score.txt"
    lines = lmk.read_text().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0] + " 0.9x"
    lmk.write_text("\n".join(lines) + "\n")
    with pytest.raises(EvalDataError) as err:
        load_ijb_meta(root, "IJBC")
    assert str(err.value) == (f"{lmk}:3: expected 'image x1 y1 ... x5 y5 faceness' (12 fields); "
                              f"field 12 is '0.9x', not a finite number")
