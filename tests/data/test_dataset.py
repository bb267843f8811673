"""Every bad-input case of the pre-flight check and tools/validate_data.py, with its message."""
from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fr_distill.config import DataConfig
from fr_distill.data import DataError, RecordIOWriter, preflight
from fr_distill.data.convert import folder_to_recordio
from fr_distill.data.decode import decode_rgb
from fr_distill.data.validate import validate_dataset
from tests.conftest import fifos, forbid_decoding, lying_jpeg, lying_png

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def jpeg_bytes(width=112, height=112, seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def check(train, **kw) -> str:
    with pytest.raises(DataError) as err:
        preflight(DataConfig(train=str(train), **kw))
    message = str(err.value)
    assert "\n" not in message
    return message


FOLDER_CASES = {
    "truncated.jpg": (lambda: jpeg_bytes()[:-300], "truncated or corrupt JPEG (no end-of-image marker FFD9)"),
    "corrupt.jpg": (lambda: b"\xff\xd8\xff" + bytes(200) + b"\xff\xd9", "corrupt JPEG (no frame header"),
    "notes.jpg": (lambda: b"identity list\n", "not a JPEG or PNG image"),
    "empty.jpg": (lambda: b"", "empty file"),
    "big.jpg": (lambda: jpeg_bytes(120, 100), "image is 120x100; training images must be aligned 112x112"),
}


@pytest.mark.parametrize("name", sorted(FOLDER_CASES))
def test_bad_image_in_folder_is_named(name, jpeg_folder):
    make, expected = FOLDER_CASES[name]
    (jpeg_folder / "id002" / name).write_bytes(make())
    message = check(jpeg_folder)
    assert message.startswith(f"{jpeg_folder / 'id002' / name}: {expected}")
    assert "data.skip_bad=true" in message


def test_png_is_accepted_and_empty_class_and_stray_files_are_named(jpeg_folder):
    Image.fromarray(np.zeros((112, 112, 3), np.uint8)).save(jpeg_folder / "id001" / "x.png")
    assert preflight(DataConfig(train=str(jpeg_folder))).num_samples == 25
    (jpeg_folder / "id009").mkdir()
    assert check(jpeg_folder).startswith(f"{jpeg_folder / 'id009'}: empty class folder")
    (jpeg_folder / "id009").rmdir()
    (jpeg_folder / "list.txt").write_text("x")
    assert check(jpeg_folder).startswith(f"{jpeg_folder / 'list.txt'}: file outside any class folder")


def test_unreadable_and_missing_paths(tmp_path, jpeg_folder):
    assert check(tmp_path / "nope") == f"{tmp_path / 'nope'}: training data path does not exist"
    assert "config key 'data.train' is empty" in check("")
    (jpeg_folder / "id000" / "link.jpg").symlink_to(tmp_path / "gone.jpg")  # dangling link
    assert check(jpeg_folder).startswith(
        f"{jpeg_folder / 'id000' / 'link.jpg'}: unreadable (No such file or directory)")


def test_special_files_in_a_training_folder_are_named_before_they_are_read(jpeg_folder):
    """Before, a FIFO hung the pre-flight (its reader waits for a writer) and a link to a device
    was read as data (``/dev/zero`` until memory runs out; ``/dev/null`` here). Both are named
    from their ``stat``, never opened, with the header checks on or off (data.preflight)."""
    fifo = jpeg_folder / "id001" / "fifo.jpg"
    device = jpeg_folder / "id002" / "device.jpg"
    device.symlink_to(os.devnull)
    with fifos(fifo):
        for header_checks in (True, False):
            assert check(jpeg_folder, preflight=header_checks).startswith(
                f"{fifo}: unreadable (a FIFO, not a regular file) (and 1 more); ")
        info = preflight(DataConfig(train=str(jpeg_folder), skip_bad=True))
    assert info.num_samples == 24 and info.bad == [
        f"{fifo}: unreadable (a FIFO, not a regular file)",
        f"{device}: unreadable (a character device, not a regular file)"]


@pytest.mark.parametrize("make, width, height", [(lying_jpeg, 30000, 30000),
                                                 (lying_png, 5000, 5000)])
def test_an_image_declaring_a_huge_size_is_refused_before_decoding(make, width, height,
                                                                   monkeypatch):
    """The training decoder (the PyTorch loader's, the decode check's, validate_data's) decoded
    a 632-byte JPEG declaring 30000x30000 pixels in full (2.7 GB) before checking its size; it
    now refuses it from the header (the decoders are tripwires here). The PNG declares less
    than PIL's own decompression-bomb limit."""
    forbid_decoding(monkeypatch)
    with pytest.raises(DataError) as err:
        decode_rgb(make(width, height), "x/y.img")
    assert str(err.value) == (f"x/y.img: cannot decode image (its header declares {width}x"
                              f"{height} pixels, more than 4096x4096; refused before decoding)")


def test_skip_bad_excludes_counts_and_logs(jpeg_folder, caplog):
    (jpeg_folder / "id001" / "bad.jpg").write_bytes(b"GIF89a")
    (jpeg_folder / "id003" / "trunc.jpg").write_bytes(jpeg_bytes()[:100])
    (jpeg_folder / "id004").mkdir()
    assert "(and 2 more)" in check(jpeg_folder)
    with caplog.at_level(logging.WARNING, logger="fr_distill"):
        info = preflight(DataConfig(train=str(jpeg_folder), skip_bad=True))
    assert info.num_samples == 24 and info.num_classes == 4 and len(info.bad) == 3
    assert all(b"bad.jpg" not in s and b"trunc.jpg" not in s for s in info.samples)
    assert "skipping 3 bad entries" in caplog.text


def make_rec(jpeg_folder, tmp_path):
    folder_to_recordio(jpeg_folder, tmp_path / "train.rec", seed=0)
    return tmp_path / "train.rec", tmp_path / "train.idx"


def test_recordio_bad_inputs(jpeg_folder, tmp_path):
    rec, idx = make_rec(jpeg_folder, tmp_path)
    good = preflight(DataConfig(train=str(tmp_path)))  # folder holding train.rec
    assert (good.format, good.num_samples, good.num_classes) == ("recordio", 24, 4)
    data = rec.read_bytes()
    rec.write_bytes(data[:-500])
    message = check(rec)
    assert message.startswith(f"{rec} record 24: truncated: needs")
    rec.write_bytes(data)
    lines = idx.read_text().splitlines()
    key, offset = lines[5].split("\t")
    idx.write_text("\n".join(lines[:5] + [f"{key}\t{int(offset) + 4}"] + lines[6:]) + "\n")
    assert check(rec).startswith(f"{rec} record {key}: bad magic")
    idx.unlink()
    assert check(rec) == f"{idx}: index file missing (needed next to train.rec)"


def test_recordio_label_out_of_range_and_bad_jpeg_record(tmp_path):
    with RecordIOWriter(tmp_path / "t.rec", tmp_path / "t.idx", header_label="auto") as w:
        w.write(0, jpeg_bytes())
        w.write(2, jpeg_bytes(seed=1))
        w.write(1, jpeg_bytes()[:-50])
    (tmp_path / "property").write_text("2,112,112")
    message = check(tmp_path / "t.rec")
    assert message.startswith(f"{tmp_path / 't.rec'} record 2: label 2 out of range [0, 2) (and 1 more)")
    info = preflight(DataConfig(train=str(tmp_path / "t.rec"), skip_bad=True))
    assert info.num_samples == 1 and info.bad[1].endswith("record 3: truncated or corrupt JPEG "
                                                          "(no end-of-image marker FFD9)")


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
