"""Training-set indexing and the pre-flight check: every bad-input case with its message, and
several training sets in ``data.train`` (label offsets, the global index, bad lists, a folder
given one level too deep or too shallow)."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from PIL import Image

from conftest import fifos, write_jpeg_folder
from fr_distill.config import DataConfig, load_config
from fr_distill.data import DataError, RecordIOWriter, preflight, scan
from fr_distill.data.convert import folder_to_recordio
from fr_distill.data.dataset import SampleBytes
from fr_distill.teacher_cache.identity import data_identity
from .conftest import jpeg_bytes


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


def message(train, **kw) -> str:
    with pytest.raises(DataError) as err:
        preflight(DataConfig(train=train, **kw))
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.timeout(180)
def test_labels_are_offset_by_the_earlier_sets_class_counts(two_sets):
    a, b = two_sets
    info = preflight(DataConfig(train=[a, b]))
    assert (info.num_samples, info.num_classes, info.format) == (22, 5, "folder+recordio")
    assert info.label_offsets() == [0, 3] and info.sample_starts() == [0, 12]
    np.testing.assert_array_equal(info.labels[:12], [0] * 4 + [1] * 4 + [2] * 4)
    set_b = preflight(DataConfig(train=b))
    np.testing.assert_array_equal(info.labels[12:], set_b.labels + 3)
    assert sorted(set(info.labels[12:].tolist())) == [3, 4]
    swapped = preflight(DataConfig(train=[b, a]))
    np.testing.assert_array_equal(swapped.labels[:10], set_b.labels)
    np.testing.assert_array_equal(swapped.labels[10:], [2] * 4 + [3] * 4 + [4] * 4)


@pytest.mark.timeout(180)
def test_global_index_reads_the_right_set_and_sample(two_sets):
    a, b = two_sets
    images = SampleBytes(preflight(DataConfig(train=[a, b])))
    first, second = SampleBytes(preflight(DataConfig(train=a))), SampleBytes(
        preflight(DataConfig(train=b)))
    assert len(images) == 22
    for i in range(22):
        part, j = (first, i) if i < 12 else (second, i - 12)
        assert images[i] == part[j] and images.name(i) == part.name(j)
    assert images.name(0) == f"{a}/id000/0.jpg"
    assert images.name(12).startswith(f"{b}/train.rec record ")


@pytest.mark.timeout(180)
def test_a_single_string_is_the_set_it_always_was(two_sets):
    a, _ = two_sets
    alone, listed = scan(a), scan([a])
    assert alone.parts == [] and alone.format == "folder" and alone.root == a
    for info in (alone, listed):
        assert (info.num_samples, info.num_classes) == (12, 3)
        np.testing.assert_array_equal(info.samples, alone.samples)
        np.testing.assert_array_equal(info.labels, alone.labels)
    assert data_identity(listed) == data_identity(alone)
    assert load_config(None, [f"data.train={a}"]).data.train == a


@pytest.mark.timeout(180)
def test_bad_lists_name_the_entry(two_sets, tmp_path):
    a, b = two_sets
    assert message([a, str(tmp_path / "gone")]) == (
        f"data.train[1]: {tmp_path / 'gone'}: training data path does not exist")
    assert message([]) == ("config key 'data.train' is an empty list: name one or more image "
                           "folders or train.rec files")
    assert message([a, ""]) == ("config key 'data.train[1]' is empty: name an image folder or "
                                "a train.rec")
    assert message([a, b, a + "/"]) == (
        f"data.train[2] {a}/: the same set as data.train[0]; a set listed twice would give its "
        f"identities two labels")
    (tmp_path / "a" / "id001" / "bad.jpg").write_bytes(b"junk")
    assert message([b, a]).startswith(f"{tmp_path / 'a' / 'id001' / 'bad.jpg'}: not a JPEG")


@pytest.mark.timeout(180)
def test_a_folder_one_level_too_deep_or_too_shallow_is_named_with_the_right_path(tmp_path):
    root = tmp_path / "data"
    write_jpeg_folder(root / "webface" / "faces", 2, 1)  # root/set/faces/id/img.jpg
    deep = root / "webface"
    assert message(str(deep)) == (
        f"{deep}: its sub-folders hold folders of images (e.g. {deep / 'faces' / 'id000'}), one "
        f"level too deep: set data.train to {deep / 'faces'}")
    write_jpeg_folder(root / "vgg", 2, 1)
    assert message(str(root)) == (
        f"{root}: its sub-folders hold folders of images (e.g. {root / 'vgg' / 'id000'}), one "
        f"level too deep: set data.train to {root / 'vgg'}, or a list of all 2 sub-folders of "
        f"{root}")
    shallow = root / "vgg" / "id001"
    assert message([str(root / "vgg"), str(shallow)]) == (
        f"data.train[1]: {shallow}: holds 1 files but no identity sub-folder with images, one "
        f"level too shallow (is this one identity's folder?): data.train must name the folder "
        f"holding one sub-folder per identity, e.g. {root / 'vgg'}")
    rec_parent = tmp_path / "download"
    folder_to_recordio(root / "vgg", tmp_path / "faces_emore.rec")
    (rec_parent / "faces_emore").mkdir(parents=True)
    for name in ("faces_emore.rec", "faces_emore.idx"):
        (tmp_path / name).rename(rec_parent / "faces_emore" / name.replace("faces_emore", "train"))
    assert message(str(rec_parent)) == (
        f"{rec_parent}: a RecordIO set in its sub-folder {rec_parent / 'faces_emore'}, one level "
        f"too deep: set data.train to {rec_parent / 'faces_emore'}")
    assert preflight(DataConfig(train=str(rec_parent / "faces_emore"))).num_samples == 2
