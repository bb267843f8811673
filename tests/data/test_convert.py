"""Image folder → RecordIO (``tools/folder2rec.py``): records byte-identical to the images,
labels from the folders, shuffled."""
from __future__ import annotations

from fr_distill.data import RecordIOReader
from fr_distill.data.convert import folder_to_recordio


def test_folder_to_rec_is_byte_identical_and_shuffled(jpeg_folder, tmp_path):
    (tmp_path / "out").mkdir()
    n = folder_to_recordio(jpeg_folder, tmp_path / "out" / "train.rec", seed=3)
    assert n == 24 and (tmp_path / "out" / "property").read_text() == "4,112,112"
    reader = RecordIOReader(tmp_path / "out" / "train.rec", tmp_path / "out" / "train.idx")
    assert reader.header == (25.0, 25.0) and len(reader) == 24
    originals = {p.read_bytes(): int(p.parent.name[2:]) for p in jpeg_folder.glob("*/*.jpg")}
    records = [reader.read(i) for i in range(24)]
    assert {data: label for label, data in records} == originals
    folder_order = [originals[p.read_bytes()] for p in sorted(jpeg_folder.glob("*/*.jpg"))]
    assert [label for label, _ in records] != folder_order  # shuffled
