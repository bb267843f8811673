"""MXNet/InsightFace RecordIO (``train.rec`` + ``train.idx``): an indexed writer and reader (METHOD §4).

Framing (dmlc-core ``recordio``): every frame is ``magic 0xced7230a`` (uint32 LE), a length
word ``lrec`` whose low 29 bits are the frame's data length and whose upper 3 bits are the
continuation flag ``cflag``, the data, then zero padding to a multiple of 4 bytes. A record
whose data holds the magic word at a 4-aligned offset is split there into frames with
cflag 1 (first), 2 (middle), 3 (last); the reader joins them, putting the magic word back
(cflag 0 is a whole record). The ``.idx`` file is text, one ``key<TAB>byte offset`` per record.

A record's payload is the image-record header ``IRHeader`` ``<IfQQ`` = (flag, label, id, id2),
then, when ``flag > 0``, ``flag`` float32 labels (the header's ``label`` field is then 0),
then the encoded image bytes.

InsightFace data sets start with a header record (id 0, ``flag > 0``) whose labels are
``(first_image_id_end, ...)``: the images are ids ``1 .. label[0] - 1``. Files without it
(``flag == 0`` on record 0, or no record 0) hold images under every key of the ``.idx``.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import DataError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_BITS = 29
LENGTH_MASK = (1 << LENGTH_BITS) - 1
FRAME_HEADER = struct.Struct("<II")  # magic, lrec
IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2


@dataclass(frozen=True)
class IRHeader:
    """The image-record header of a payload; ``labels`` are the float labels (1 or ``flag``)."""

    flag: int
    labels: tuple[float, ...]
    id: int
    id2: int


def pack_payload(record_id: int, labels: Sequence[float], image_bytes: bytes) -> bytes:
    """Payload of one record: IRHeader, float32 labels when there are several, image bytes."""
    labels = tuple(float(x) for x in labels)
    if len(labels) == 1:
        return IR_HEADER.pack(0, labels[0], record_id, 0) + image_bytes
    return (IR_HEADER.pack(len(labels), 0.0, record_id, 0)
            + np.asarray(labels, dtype="<f4").tobytes() + image_bytes)


def unpack_payload(payload: bytes, where: str) -> tuple[IRHeader, bytes]:
    """Split a payload into its :class:`IRHeader` and the image bytes."""
    if len(payload) < IR_HEADER.size:
        raise DataError(f"{where}: payload of {len(payload)} bytes is shorter than the "
                        f"{IR_HEADER.size}-byte image-record header")
    flag, label, rid, rid2 = IR_HEADER.unpack_from(payload)
    start = IR_HEADER.size
    if flag == 0:
        return IRHeader(0, (label,), rid, rid2), payload[start:]
    end = start + 4 * flag
    if end > len(payload):
        raise DataError(f"{where}: header announces {flag} labels but the payload has only "
                        f"{len(payload)} bytes")
    labels = tuple(float(x) for x in np.frombuffer(payload, dtype="<f4", count=flag, offset=start))
    return IRHeader(flag, labels, rid, rid2), payload[end:]


def _frames(payload: bytes) -> list[tuple[int, bytes]]:
    """(cflag, data) frames of one record, split where the magic word sits 4-aligned."""
    cuts = []
    pos = payload.find(MAGIC_BYTES)
    while pos >= 0:
        if pos % 4 == 0:
            cuts.append(pos)
            pos = payload.find(MAGIC_BYTES, pos + 4)
        else:
            pos = payload.find(MAGIC_BYTES, pos + 1)
    if not cuts:
        return [(0, payload)]
    frames, start = [], 0
    for i, cut in enumerate(cuts):
        frames.append((1 if i == 0 else 2, payload[start:cut]))
        start = cut + 4
    frames.append((3, payload[start:]))
    return frames


class RecordIOWriter:
    """Writes an indexed RecordIO pair; a context manager.

    ``header_label``: ``None`` writes a plain file (image ids 0, 1, …); ``"auto"`` writes the
    InsightFace header record first and fills in ``(first_image_id_end, first_image_id_end)``
    on close (images are ids 1..N, no identity records); a sequence of floats writes that
    header label as given (images are ids 1, 2, …).
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike,
                 header_label: str | Sequence[float] | None = None) -> None:
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w")
        self._auto_header = header_label == "auto"
        self._next_id = 0
        self.num_images = 0
        if header_label is not None:
            self._header_label = (0.0, 0.0) if self._auto_header else tuple(header_label)
            if len(self._header_label) < 2:
                raise DataError(f"{self.rec_path}: an InsightFace header label needs at least "
                                f"2 values, got {self._header_label!r}")
            self._write_record(0, pack_payload(0, self._header_label, b""))

    def write(self, label: int, image_bytes: bytes, extra_labels: Sequence[float] = ()) -> int:
        """Append one image record; returns its record id."""
        record_id = self._next_id
        labels = (float(label), *map(float, extra_labels))
        self._write_record(record_id, pack_payload(record_id, labels, bytes(image_bytes)))
        self.num_images += 1
        return record_id

    def _write_record(self, record_id: int, payload: bytes) -> None:
        self._idx.write(f"{record_id}\t{self._rec.tell()}\n")
        for cflag, data in _frames(payload):
            if len(data) > LENGTH_MASK:
                raise DataError(f"{self.rec_path}: record {record_id} frame of {len(data)} bytes "
                                f"exceeds the 29-bit length limit")
            self._rec.write(FRAME_HEADER.pack(MAGIC, (cflag << LENGTH_BITS) | len(data)))
            self._rec.write(data)
            self._rec.write(b"\0" * (-len(data) % 4))
        self._next_id = record_id + 1

    def close(self) -> None:
        """Finish the file: fill in the automatic header label, close both files."""
        if self._rec.closed:
            return
        if self._auto_header:
            end = float(self.num_images + 1)
            header = pack_payload(0, (end, end), b"")
            assert len(_frames(header)) == 1, "header label bytes collide with the magic word"
            self._rec.seek(FRAME_HEADER.size)
            self._rec.write(header)
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_index(idx_path: Path, rec_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Keys and byte offsets (int64 arrays, file order) of a ``.idx`` file."""
    if not idx_path.is_file():
        raise DataError(f"{idx_path}: index file missing (needed next to {rec_path.name})")
    keys, offsets = [], []
    with open(idx_path) as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                key, offset = int(parts[0]), int(parts[1])
            except (ValueError, IndexError):
                raise DataError(f"{idx_path}:{line_no}: malformed index line {line.strip()!r} "
                                f"(expected 'key<TAB>offset')") from None
            keys.append(key)
            offsets.append(offset)
    if not keys:
        raise DataError(f"{idx_path}: index file is empty")
    return np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


class RecordIOReader:
    """Random access to the images of an indexed RecordIO pair; picklable (reopens lazily).

    ``len(reader)`` is the number of images, ``reader.read(i)`` returns the i-th image's
    ``(label, image_bytes)``; ``reader.keys`` are the images' record ids, ``reader.offsets``
    their byte offsets, ``reader.header`` the InsightFace header labels (or ``None``).
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike) -> None:
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        if not self.rec_path.is_file():
            raise DataError(f"{self.rec_path}: RecordIO file missing or not a file")
        self.file_size = self.rec_path.stat().st_size
        all_keys, all_offsets = read_index(self.idx_path, self.rec_path)
        order = np.argsort(all_keys, kind="stable")
        self._sorted_keys, self._sorted_offsets = all_keys[order], all_offsets[order]
        if len(self._sorted_keys) > 1 and (np.diff(self._sorted_keys) == 0).any():
            raise DataError(f"{self.idx_path}: duplicate record keys in the index")
        self._fd: int | None = None
        self._pid = -1
        self.header: tuple[float, ...] | None = None
        if self._has_key(0):
            head, _ = self.read_key(0)
            if head.flag > 0:
                self.header = head.labels
        if self.header is None:
            self.keys, self.offsets = all_keys, all_offsets
        else:
            end = int(self.header[0])
            self.keys = np.arange(1, max(end, 1), dtype=np.int64)
            found = np.searchsorted(self._sorted_keys, self.keys)
            found = np.minimum(found, len(self._sorted_keys) - 1)
            if end < 1 or not np.array_equal(self._sorted_keys[found], self.keys):
                raise DataError(f"{self.idx_path}: InsightFace header says images are ids 1.."
                                f"{end - 1} but the index lacks some of them (has {len(all_keys)} "
                                f"keys); .idx and .rec do not match")
            self.offsets = self._sorted_offsets[found]

    def _has_key(self, key: int) -> bool:
        pos = int(np.searchsorted(self._sorted_keys, key))
        return pos < len(self._sorted_keys) and int(self._sorted_keys[pos]) == key

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"], state["_pid"] = None, -1
        return state

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.rec_path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def _pread(self, size: int, offset: int, key: int) -> bytes:
        data = os.pread(self._file(), size, offset)
        if len(data) != size:
            raise DataError(f"{self.rec_path}: record {key} truncated at offset {offset} "
                            f"(needs {size} bytes, file has {self.file_size})")
        return data

    def payload_at(self, offset: int, key: int) -> bytes:
        """The payload of the record at ``offset``, frames joined as MXNet does."""
        parts: list[bytes] = []
        while True:
            magic, lrec = FRAME_HEADER.unpack(self._pread(FRAME_HEADER.size, offset, key))
            if magic != MAGIC:
                raise DataError(f"{self.rec_path}: record {key} at offset {offset} has bad magic "
                                f"0x{magic:08x} (expected 0x{MAGIC:08x}); .idx does not match .rec")
            cflag, length = lrec >> LENGTH_BITS, lrec & LENGTH_MASK
            if cflag > 3:
                raise DataError(f"{self.rec_path}: record {key} at offset {offset} has invalid "
                                f"continuation flag {cflag}")
            parts.append(self._pread(length, offset + FRAME_HEADER.size, key))
            if cflag in (0, 3):
                return MAGIC_BYTES.join(parts)
            offset += FRAME_HEADER.size + length + (-length % 4)

    def read_key(self, key: int) -> tuple[IRHeader, bytes]:
        """Header and image bytes of the record with id ``key``."""
        if not self._has_key(key):
            raise DataError(f"{self.idx_path}: no record with id {key} in the index")
        offset = int(self._sorted_offsets[np.searchsorted(self._sorted_keys, key)])
        return unpack_payload(self.payload_at(offset, key), f"{self.rec_path} record {key}")

    def read(self, i: int) -> tuple[int, bytes]:
        """``(label, image_bytes)`` of the i-th image (0-based over the images)."""
        key = int(self.keys[i])
        head, image = unpack_payload(self.payload_at(int(self.offsets[i]), key),
                                     f"{self.rec_path} record {key}")
        return int(head.labels[0]), image

    def close(self) -> None:
        """Close this process's file handle (reads reopen it)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RecordIOReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
