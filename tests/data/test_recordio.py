"""RecordIO: framing against an independent parse, the InsightFace header, DALI's reader,
and the reader's errors."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from fr_distill.data import DataError, RecordIOReader, RecordIOWriter
from fr_distill.data.convert import folder_to_recordio
from fr_distill.data.recordio import MAGIC_BYTES

# the magic word 4-aligned inside a payload (24-byte IRHeader + 4): MXNet splits the record there
WITH_MAGIC = b"abcd" + MAGIC_BYTES + b"tail!"


def parse_frames(rec: bytes) -> list[tuple[int, int, bytes]]:
    """Independent reading of the dmlc framing: (offset, cflag, data) per frame."""
    frames, pos = [], 0
    while pos < len(rec):
        magic, lrec = struct.unpack_from("<II", rec, pos)
        assert magic == 0xCED7230A
        length = lrec & ((1 << 29) - 1)
        frames.append((pos, lrec >> 29, rec[pos + 8:pos + 8 + length]))
        pos += 8 + length + (-length % 4)
    return frames


def test_plain_file_layout_and_round_trip(tmp_path):
    images = [b"\x01\x02\x03", b"x" * 17, WITH_MAGIC]
    with RecordIOWriter(tmp_path / "a.rec", tmp_path / "a.idx") as w:
        for label, data in enumerate(images):
            w.write(label * 10, data, extra_labels=(7.5,) if label == 1 else ())
    frames = parse_frames((tmp_path / "a.rec").read_bytes())
    idx = [tuple(map(int, line.split("\t"))) for line in (tmp_path / "a.idx").read_text().split("\n") if line]
    assert [k for k, _ in idx] == [0, 1, 2]
    # record 0: flag 0, label in the header field, id 0
    assert frames[0][1] == 0 and frames[0][2] == struct.pack("<IfQQ", 0, 0.0, 0, 0) + images[0]
    # record 1: two labels stored as float32 after the header, header label field 0
    assert frames[1][2] == struct.pack("<IfQQ", 2, 0.0, 1, 0) + struct.pack("<ff", 10.0, 7.5) + images[1]
    # record 2 is split at the magic word: cflag 1 then 3
    assert [f[1] for f in frames[2:]] == [1, 3] and idx[2][1] == frames[2][0]
    reader = RecordIOReader(tmp_path / "a.rec", tmp_path / "a.idx")
    assert reader.header is None and len(reader) == 3
    assert [reader.read(i) for i in range(3)] == [(0, images[0]), (10, images[1]), (20, images[2])]
    head, _ = reader.read_key(1)
    assert head.flag == 2 and head.labels == (10.0, 7.5)


def test_insightface_header_record(tmp_path):
    with RecordIOWriter(tmp_path / "b.rec", tmp_path / "b.idx", header_label="auto") as w:
        assert [w.write(label, bytes([label]) * 5) for label in range(4)] == [1, 2, 3, 4]
    frames = parse_frames((tmp_path / "b.rec").read_bytes())
    assert frames[0][2] == struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<ff", 5.0, 5.0)
    reader = RecordIOReader(tmp_path / "b.rec", tmp_path / "b.idx")
    assert reader.header == (5.0, 5.0) and reader.keys.tolist() == [1, 2, 3, 4]
    assert reader.read(2) == (2, b"\x02" * 5)
    # an explicit header label with identity records after the images (InsightFace's layout)
    with RecordIOWriter(tmp_path / "c.rec", tmp_path / "c.idx", header_label=(3.0, 4.0)) as w:
        w.write(0, b"img1")
        w.write(1, b"img2")
        w.write(0, b"", extra_labels=(2.0,))  # identity record id 3: images 1..2
    reader = RecordIOReader(tmp_path / "c.rec", tmp_path / "c.idx")
    assert len(reader) == 2 and reader.read(1) == (1, b"img2")


def test_plain_layout_is_read_by_dalis_mxnet_reader(jpeg_folder, tmp_path):
    from nvidia.dali import fn, pipeline_def

    folder_to_recordio(jpeg_folder, tmp_path / "plain.rec", seed=1, insightface_header=False)
    ours = RecordIOReader(tmp_path / "plain.rec", tmp_path / "plain.idx")

    @pipeline_def(batch_size=24, num_threads=1, device_id=None)
    def native():
        encoded, labels = fn.readers.mxnet(path=str(tmp_path / "plain.rec"),
                                           index_path=str(tmp_path / "plain.idx"))
        return encoded, labels

    pipe = native()
    pipe.build()
    encoded, labels = pipe.run()
    got = [(int(np.asarray(labels[i])[0]), np.asarray(encoded[i]).tobytes()) for i in range(24)]
    assert got == [ours.read(i) for i in range(24)]


def test_reader_errors_name_the_file(tmp_path):
    with RecordIOWriter(tmp_path / "d.rec", tmp_path / "d.idx") as w:
        w.write(0, b"payload")
    with pytest.raises(DataError, match=r"e\.idx: index file missing"):
        RecordIOReader(tmp_path / "d.rec", tmp_path / "e.idx")
    (tmp_path / "bad.idx").write_text("0\t0\nnot-a-line\n")
    with pytest.raises(DataError, match=r"bad\.idx:2: malformed index line"):
        RecordIOReader(tmp_path / "d.rec", tmp_path / "bad.idx")
    (tmp_path / "shift.idx").write_text("0\t4\n")
    with pytest.raises(DataError, match=r"d\.rec: record 0 at offset 4 has bad magic"):
        RecordIOReader(tmp_path / "d.rec", tmp_path / "shift.idx").read(0)
    data = (tmp_path / "d.rec").read_bytes()
    Path(tmp_path / "d.rec").write_bytes(data[:-6])
    with pytest.raises(DataError, match=r"d\.rec: record 0 truncated"):
        RecordIOReader(tmp_path / "d.rec", tmp_path / "d.idx").read(0)


def test_index_not_matching_the_insightface_header_or_with_duplicates(tmp_path):
    with RecordIOWriter(tmp_path / "h.rec", tmp_path / "h.idx", header_label="auto") as w:
        for label in range(3):
            w.write(label, b"img")
    lines = (tmp_path / "h.idx").read_text().splitlines()
    (tmp_path / "h.idx").write_text("\n".join(lines[:2] + lines[3:]) + "\n")  # drop id 2
    with pytest.raises(DataError, match=r"h\.idx: InsightFace header says images are ids 1\.\.3 "
                                         r"but the index lacks some of them"):
        RecordIOReader(tmp_path / "h.rec", tmp_path / "h.idx")
    (tmp_path / "h.idx").write_text("\n".join(lines + lines[1:2]) + "\n")
    with pytest.raises(DataError, match=r"h\.idx: duplicate record keys"):
        RecordIOReader(tmp_path / "h.rec", tmp_path / "h.idx")
