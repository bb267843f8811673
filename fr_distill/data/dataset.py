"""Training-set indexing and the pre-flight check (METHOD §4).

A training set is an image folder (one sub-folder per identity, aligned 112×112 JPEG/PNG
images; labels are the sorted folder positions) or an InsightFace RecordIO pair; ``data.train``
names one, or a list of several, trained on as their concatenation (:func:`concat`: set k's
samples follow those of the sets before it, its labels are offset by their class counts, so
identities of different sets never share a label). :func:`preflight`
lists every sample and checks it from headers and sizes only (no decoding): image magic,
JPEG end-of-image marker / PNG ``IEND``, width×height from the JPEG SOF or PNG IHDR,
non-empty regular files (a FIFO, a device or a socket, or a link to one, is refused by name
before it is opened) and class folders; for RecordIO also ``.idx``/``.rec`` agreement, each
record's magic and length within the file, and integer labels in range. Anything wrong
raises one-line :class:`DataError` naming the file/record, or — with ``data.skip_bad`` — is
left out and counted in ``DatasetInfo.bad`` and the ``fr_distill`` log. Nothing is dropped
silently (hidden entries, names starting with ``.``, are not data and are ignored). Images that
are not 112×112 are errors: training data must be aligned first (``tools/align_faces.py``).
Folder labels are the positions of the non-empty class folders in sorted order; RecordIO
labels are the records' own, bounded by InsightFace's ``property`` file when present.
"""
from __future__ import annotations

import logging
import mmap
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fr_distill.config import train_source
from fr_distill.paths import NotRegularFileError, check_regular, open_regular, read_regular

from .errors import DataError
from .recordio import FRAME_HEADER, IR_HEADER, LENGTH_BITS, LENGTH_MASK, MAGIC, RecordIOReader

LOG = logging.getLogger("fr_distill")
IMAGE_SIZE = 112
HEAD_BYTES = 65536  # enough for the JPEG SOF after EXIF/ICC segments
TAIL_BYTES = 64
CHECK_CHUNK = 512  # files per pre-flight task
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass
class DatasetInfo:
    """What the pre-flight check found: sample count, classes, format, the bad entries skipped.

    ``samples`` are folder-relative paths (bytes) or positions in the RecordIO reader's image
    list, ``labels`` their int64 labels; ``root`` is the folder or the ``.rec`` file. A
    concatenation of several sets holds them in ``parts`` (its ``samples`` are the global
    indices, its ``labels`` the offset labels, its ``format`` e.g. ``folder+recordio``).
    """

    num_samples: int
    num_classes: int
    format: str
    bad: list[str]
    root: str = ""
    idx_path: str = ""
    samples: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64), repr=False)
    labels: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64), repr=False)
    class_names: list[str] = field(default_factory=list, repr=False)
    parts: list[DatasetInfo] = field(default_factory=list, repr=False)

    def sets(self) -> list[DatasetInfo]:
        """The single sets: ``parts``, or this set alone."""
        return self.parts or [self]

    def label_offsets(self) -> list[int]:
        """The first label of each of :meth:`sets` (the class counts of the sets before it)."""
        return _starts([p.num_classes for p in self.sets()])

    def sample_starts(self) -> list[int]:
        """The first global sample index of each of :meth:`sets`."""
        return _starts([p.num_samples for p in self.sets()])


def _starts(counts: list[int]) -> list[int]:
    """Where each of consecutive runs of ``counts`` items starts."""
    return np.cumsum([0] + counts)[:-1].tolist()


# --------------------------------------------------------------------------------------
# Header checks of one encoded image
# --------------------------------------------------------------------------------------
def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the first SOF marker within ``head``, or None."""
    i, n = 2, len(head)
    while i + 4 <= n:
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            i += 2
            continue
        if marker in _SOF_MARKERS:
            if i + 9 > n:
                return None
            height, width = struct.unpack_from(">HH", head, i + 5)
            return width, height
        if marker in (0xDA, 0xD9):
            return None
        i += 2 + int.from_bytes(head[i + 2:i + 4], "big")
    return None


def image_problem(head: bytes, tail: bytes, size: int) -> str | None:
    """What is wrong with an encoded image from its first/last bytes and size, or None."""
    if size == 0:
        return "empty file"
    if head.startswith(JPEG_MAGIC):
        if b"\xff\xd9" not in tail:
            return "truncated or corrupt JPEG (no end-of-image marker FFD9)"
        dims = _jpeg_size(head)
        if dims is None:
            return "corrupt JPEG (no frame header before the scan)"
    elif head.startswith(PNG_MAGIC):
        if len(head) < 24 or head[12:16] != b"IHDR":
            return "corrupt PNG (no IHDR chunk)"
        if not tail.endswith(b"IEND\xaeB`\x82"):
            return "truncated or corrupt PNG (no IEND chunk)"
        dims = struct.unpack_from(">II", head, 16)
    else:
        return "not a JPEG or PNG image"
    if dims != (IMAGE_SIZE, IMAGE_SIZE):
        return (f"image is {dims[0]}x{dims[1]}; training images must be aligned "
                f"{IMAGE_SIZE}x{IMAGE_SIZE} (tools/align_faces.py)")
    return None


# --------------------------------------------------------------------------------------
# Locating the data set
# --------------------------------------------------------------------------------------
def resolve(train: str, fmt: str = "auto") -> tuple[str, Path, Path | None]:
    """(format, folder or .rec path, .idx path or None) of the ``data.train`` setting."""
    if not train:
        raise DataError("config key 'data.train' is empty: name an image folder or a train.rec")
    path = Path(train)
    if not os.path.exists(path):
        raise DataError(f"{path}: training data path does not exist")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: training data path is not readable")
    found, path, index = train_source(train, fmt)
    if found == "recordio" and not path.is_file():
        raise DataError(f"{path}: data.format is recordio but this is not a .rec file")
    if found == "folder" and not path.is_dir():
        raise DataError(f"{path}: not an image folder (data.format={fmt})")
    return found, path, index


# --------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------
def _check_file(path: str) -> str | None:
    """What is wrong with the image file ``path`` (unreadable, or no regular file: a FIFO
    would block the check, a device would never end; see :func:`image_problem`), or None."""
    try:
        with open_regular(path, buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(HEAD_BYTES)
            tail = head[-TAIL_BYTES:] if size <= HEAD_BYTES else os.pread(
                f.fileno(), TAIL_BYTES, size - TAIL_BYTES)
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    return image_problem(head, tail, size)


def _special_file_problem(path: str) -> str | None:
    """The problem of ``path`` when it is a FIFO, a device or a socket (links followed), else
    None (a regular file; a missing file or a dangling link is named when it is read)."""
    try:
        check_regular(path)
    except NotRegularFileError as err:
        return f"unreadable ({err.strerror})"
    except OSError:
        pass
    return None


def _listing(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder`` that are data (not hidden), sorted; none if unreadable."""
    try:
        return sorted((e for e in os.scandir(folder) if not e.name.startswith(".")),
                      key=lambda e: e.name)
    except OSError:
        return []


def _depth_problem(root: Path, class_dirs: list[str], stray_files: int) -> str | None:
    """Why a folder none of whose sub-folders holds images is probably the wrong level, with
    the path ``data.train`` should name (one line), or None when it does not look like it."""
    for name in class_dirs[:8]:
        for inner in _listing(root / name):
            if inner.is_dir() and any(not e.is_dir() for e in _listing(Path(inner.path))):
                others = (f", or a list of all {len(class_dirs)} sub-folders of {root}"
                          if len(class_dirs) > 1 else "")
                return (f"{root}: its sub-folders hold folders of images (e.g. "
                        f"{root / name / inner.name}), one level too deep: set data.train to "
                        f"{root / name}{others}")
    if stray_files:
        return (f"{root}: holds {stray_files} files but no identity sub-folder with images, one "
                f"level too shallow (is this one identity's folder?): data.train must name the "
                f"folder holding one sub-folder per identity, e.g. {root.parent}")
    return None


def _index_folder(root: Path, check: bool) -> tuple[list[str], list[bytes], list[int], list[str]]:
    """Class names, relative paths, labels and bad entries of an image folder."""
    bad: list[str] = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as err:
        raise DataError(f"{root}: cannot list the image folder ({err.strerror})") from None
    class_dirs = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            class_dirs.append(entry.name)
        else:
            bad.append(f"{root / entry.name}: file outside any class folder")
    names, rel_paths, labels = [], [], []
    for name in class_dirs:
        try:
            entries_of_class = [e for e in os.scandir(root / name)
                                if not e.name.startswith(".") and not e.is_dir()]
        except OSError as err:
            bad.append(f"{root / name}: cannot list class folder ({err.strerror})")
            continue
        # FIFOs, devices and sockets are named here, header checks on or off: reading one
        # would block or never end (is_file follows links; a regular file costs no stat)
        special = {e.name: problem for e in entries_of_class
                   if not e.is_file() and (problem := _special_file_problem(e.path))}
        bad += [f"{root / name / file}: {problem}" for file, problem in sorted(special.items())]
        files = sorted(e.name for e in entries_of_class if e.name not in special)
        if not files:
            bad.append(f"{root / name}: empty class folder")
            continue
        if "train.rec" in files:
            raise DataError(f"{root}: a RecordIO set in its sub-folder {root / name}, one level "
                            f"too deep: set data.train to {root / name}")
        label = len(names)
        names.append(name)
        rel_paths += [f"{name}/{f}".encode() for f in files]
        labels += [label] * len(files)
    if not names:
        stray = sum(1 for entry in entries if not entry.name.startswith(".") and not entry.is_dir())
        problem = _depth_problem(root, class_dirs, stray)
        if problem:
            raise DataError(problem)
    if check and rel_paths:
        def check_chunk(chunk: list[bytes]) -> list[str | None]:
            return [_check_file(os.path.join(root, p.decode())) for p in chunk]

        # threads hide file-system latency (network storage); chunks keep the overhead low
        chunks = [rel_paths[i:i + CHECK_CHUNK] for i in range(0, len(rel_paths), CHECK_CHUNK)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            problems = [p for chunk in pool.map(check_chunk, chunks) for p in chunk]
        keep = []
        for i, problem in enumerate(problems):
            if problem is None:
                keep.append(i)
            else:
                bad.append(f"{root / rel_paths[i].decode()}: {problem}")
        if len(keep) < len(rel_paths):
            rel_paths = [rel_paths[i] for i in keep]
            labels = [labels[i] for i in keep]
    return names, rel_paths, labels, bad


# --------------------------------------------------------------------------------------
# RecordIO
# --------------------------------------------------------------------------------------
def _num_classes_property(rec_path: Path) -> int | None:
    """InsightFace's ``property`` file next to the .rec: ``num_classes,height,width``."""
    prop = rec_path.parent / "property"
    if not prop.is_file():
        return None
    try:
        return int(prop.read_text().split(",")[0])
    except ValueError:
        raise DataError(f"{prop}: malformed (expected 'num_classes,height,width')") from None


def _record_problem(buf: mmap.mmap | bytes, offset: int, file_size: int, check: bool
                    ) -> tuple[str | None, float]:
    """(problem or None, label) of the record at ``offset``, from its headers."""
    if offset < 0 or offset + FRAME_HEADER.size > file_size:
        return f"offset {offset} beyond the end of the file ({file_size} bytes); .idx does not " \
               f"match .rec or .rec is truncated", 0.0
    magic, lrec = FRAME_HEADER.unpack_from(buf, offset)
    if magic != MAGIC:
        return f"bad magic 0x{magic:08x} at offset {offset}; .idx does not match .rec", 0.0
    cflag, length = lrec >> LENGTH_BITS, lrec & LENGTH_MASK
    start = offset + FRAME_HEADER.size
    if start + length > file_size:
        return (f"truncated: needs {length} bytes at offset {start}, file has {file_size}; "
                f".rec is truncated"), 0.0
    if cflag != 0:
        return None, float("nan")  # split record: checked after joining its frames
    if length < IR_HEADER.size:
        return f"payload of {length} bytes is shorter than the image-record header", 0.0
    flag, label = struct.unpack_from("<If", buf, start)
    image_start = start + IR_HEADER.size + 4 * flag
    if flag:
        if image_start > start + length:
            return f"header announces {flag} labels but the payload has {length} bytes", 0.0
        label = struct.unpack_from("<f", buf, start + IR_HEADER.size)[0]
    if check:
        end = start + length
        problem = image_problem(bytes(buf[image_start:min(end, image_start + HEAD_BYTES)]),
                                bytes(buf[max(image_start, end - TAIL_BYTES):end]),
                                end - image_start)
        if problem:
            return problem, label
    return None, label


def _index_recordio(rec_path: Path, idx_path: Path, check: bool
                    ) -> tuple[RecordIOReader, list[int], list[int], list[str], int]:
    """Reader, good positions, their labels, bad entries and the class count of a RecordIO pair."""
    reader = RecordIOReader(rec_path, idx_path)
    declared = _num_classes_property(rec_path)
    positions, labels, bad = [], [], []
    with open(rec_path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if reader.file_size else b""
        for pos, (key, offset) in enumerate(zip(reader.keys.tolist(), reader.offsets.tolist())):
            problem, label = _record_problem(buf, offset, reader.file_size, check)
            if problem is None and label != label:  # split record: join and check fully
                try:
                    label, image = reader.read(pos)
                    problem = image_problem(image[:HEAD_BYTES], image[-TAIL_BYTES:], len(image)) \
                        if check else None
                except DataError as err:
                    problem = str(err).split(": ", 1)[-1]
            if problem is None and (label != int(label) or label < 0 or
                                    (declared is not None and label >= declared)):
                limit = f"[0, {declared})" if declared is not None else "non-negative integers"
                problem = f"label {label:g} out of range {limit}"
            if problem is None:
                positions.append(pos)
                labels.append(int(label))
            else:
                bad.append(f"{rec_path} record {key}: {problem}")
        if isinstance(buf, mmap.mmap):
            buf.close()
    num_classes = declared if declared is not None else (max(labels) + 1 if labels else 0)
    return reader, positions, labels, bad, num_classes


# --------------------------------------------------------------------------------------
# The pre-flight check
# --------------------------------------------------------------------------------------
def _check_entries(train: list[str]) -> None:
    """Refuse an empty list, an empty entry, and a set listed twice (by its real path)."""
    if not train:
        raise DataError("config key 'data.train' is an empty list: name one or more image "
                        "folders or train.rec files")
    seen: dict[str, int] = {}
    for i, entry in enumerate(train):
        if not entry:
            raise DataError(f"config key 'data.train[{i}]' is empty: name an image folder or a "
                            f"train.rec")
        same = os.path.realpath(entry)
        if same in seen:
            raise DataError(f"data.train[{i}] {entry}: the same set as data.train[{seen[same]}]; "
                            f"a set listed twice would give its identities two labels")
        seen[same] = i


def concat(parts: list[DatasetInfo]) -> DatasetInfo:
    """One training set of several: samples in order of the sets, labels of set k offset by
    the class counts of the sets before it."""
    if len(parts) == 1:
        return parts[0]
    offsets = _starts([p.num_classes for p in parts])
    labels = np.concatenate([p.labels + offset for p, offset in zip(parts, offsets)])
    names = [f"{k}:{name}" for k, p in enumerate(parts)
             for name in (p.class_names or [str(label) for label in range(p.num_classes)])]
    return DatasetInfo(len(labels), sum(p.num_classes for p in parts),
                       "+".join(p.format for p in parts), [b for p in parts for b in p.bad],
                       ", ".join(p.root for p in parts), "", np.arange(len(labels), dtype=np.int64),
                       labels.astype(np.int64), names, list(parts))


def scan(train: str | list[str], fmt: str = "auto", check: bool = True) -> DatasetInfo:
    """Index the training set(s) and list (not raise) every bad entry in ``DatasetInfo.bad``;
    ``data.format`` applies to every entry (``auto``: each entry detected on its own)."""
    if isinstance(train, str):
        return _scan_one(train, fmt, check)
    _check_entries(train)
    parts = []
    for i, entry in enumerate(train):
        try:
            parts.append(_scan_one(entry, fmt, check))
        except DataError as err:
            raise DataError(f"data.train[{i}]: {err}") from None
    return concat(parts)


def _scan_one(train: str, fmt: str, check: bool) -> DatasetInfo:
    """Index one set: an image folder or a RecordIO pair."""
    kind, root, idx_path = resolve(train, fmt)
    if kind == "folder":
        names, rel_paths, labels, bad = _index_folder(root, check)
        samples = np.asarray(rel_paths, dtype=bytes) if rel_paths else np.empty(0, dtype="S1")
        return DatasetInfo(len(rel_paths), len(names), kind, bad, str(root), "",
                           samples, np.asarray(labels, dtype=np.int64), names)
    _, positions, labels, bad, num_classes = _index_recordio(root, idx_path, check)
    return DatasetInfo(len(positions), num_classes, kind, bad, str(root), str(idx_path),
                       np.asarray(positions, dtype=np.int64), np.asarray(labels, dtype=np.int64))


def preflight(data_cfg) -> DatasetInfo:
    """Index and check ``data_cfg.train`` before training (headers and sizes, no decoding).

    Raises :class:`DataError` naming the first bad file/record unless ``data_cfg.skip_bad``,
    in which case the bad entries are excluded, listed in ``DatasetInfo.bad`` and logged.
    """
    info = scan(data_cfg.train, data_cfg.format, check=data_cfg.preflight)
    if info.bad:
        more = f" (and {len(info.bad) - 1} more)" if len(info.bad) > 1 else ""
        if not data_cfg.skip_bad:
            raise DataError(f"{info.bad[0]}{more}; run tools/validate_data.py for the full list "
                            f"or set data.skip_bad=true to skip bad records")
        LOG.warning("data pre-flight: skipping %d bad entries of %s, e.g. %s", len(info.bad),
                    info.root, info.bad[0])
    for part in info.sets():
        if part.num_samples == 0:
            raise DataError(f"{part.root}: no usable training samples")
    return info


# --------------------------------------------------------------------------------------
# Reading encoded samples (used by both loaders; picklable for worker processes)
# --------------------------------------------------------------------------------------
class SampleBytes:
    """``images[i]`` → the encoded bytes of data-set sample ``i`` of a :class:`DatasetInfo`
    (of a concatenation: of the set holding global index ``i``)."""

    def __init__(self, info: DatasetInfo) -> None:
        self.format, self.samples = info.format, info.samples
        self.root = Path(info.root)
        self.root_str = str(self.root)
        self.reader = RecordIOReader(info.root, info.idx_path) if info.format == "recordio" else None
        self.parts = [SampleBytes(p) for p in info.parts]
        self.starts = np.asarray(info.sample_starts(), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def _locate(self, i: int) -> tuple[SampleBytes, int]:
        """The set holding global sample ``i`` and ``i``'s index in it."""
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[k], int(i) - int(self.starts[k])

    def name(self, i: int) -> str:
        """The file or record of sample ``i``, for messages."""
        if self.parts:
            part, j = self._locate(i)
            return part.name(j)
        if self.reader is not None:
            return f"{self.reader.rec_path} record {int(self.reader.keys[int(self.samples[i])])}"
        return str(self.root / self.samples[i].decode())

    def __getitem__(self, i: int) -> bytes:
        if self.parts:
            part, j = self._locate(i)
            return part[j]
        if self.reader is not None:
            return self.reader.read(int(self.samples[i]))[1]
        path = os.path.join(self.root_str, self.samples[i].decode())
        try:
            return read_regular(path)
        except OSError as err:
            raise DataError(f"{path}: unreadable ({err.strerror or err})") from None
