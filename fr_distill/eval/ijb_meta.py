"""Reading an IJB-B / IJB-C release (METHOD V2, V3), with one-line errors naming file and line.

Layout (InsightFace's): ``<root>/loose_crop/<images>`` and ``<root>/meta/`` holding
``<name>_face_tid_mid.txt`` (``img tid mid``), ``<name>_name_5pts_score.txt``
(``img x1 y1 … x5 y5 faceness``, same images in the same order), ``<name>_template_pair_label.txt``
(``t1 t2 label``) and, for 1:N, ``<name>_1N_gallery_G1.csv`` / ``_G2.csv`` (IJB-C; ``S1``/``S2``
for IJB-B) and ``<name>_1N_probe_mixed.csv`` (header row, then ``TEMPLATE_ID,SUBJECT_ID,…``).
``<name>`` is the lower-cased set name (``ijbc``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import EvalDataError


@dataclass
class IJBMeta:
    """One IJB set's protocol tables."""

    name: str
    image_paths: list[str]
    landmarks: np.ndarray  # [N, 5, 2] float32
    faceness: np.ndarray  # [N] float32
    templates: np.ndarray  # [N] int64
    medias: np.ndarray  # [N] int64
    t1: np.ndarray  # [P] int64
    t2: np.ndarray  # [P] int64
    labels: np.ndarray  # [P] int64
    galleries: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    probes: tuple[np.ndarray, np.ndarray] | None = None  # (template ids, subject ids)


def _require(path: Path) -> Path:
    if not path.is_file():
        raise EvalDataError(f"{path}: meta file not found")
    return path


def _lines(path: Path) -> list[str]:
    return _require(path).read_text().splitlines()


def _parse_rows(path: Path, lines: list[str], parse, expected: str) -> list:
    """``parse(fields)`` of every non-empty whitespace-separated line; a line it rejects (by
    raising ValueError naming the field) stops with one line naming the file, the line
    number, ``expected`` and the field at fault."""
    rows = []
    for number, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        try:
            rows.append(parse(parts))
        except ValueError as err:
            raise EvalDataError(f"{path}:{number}: expected {expected}; {err}") from None
    return rows


def _fields(parts: list[str], count: int) -> list[str]:
    if len(parts) != count:
        raise ValueError(f"the line has {len(parts)} fields")
    return parts


def _field(parts: list[str], index: int, kind: type):
    """Field ``index`` (0-based) converted to ``kind`` (a finite number for float)."""
    try:
        value = kind(parts[index])
    except ValueError:
        value = None
    if value is None or (kind is float and not np.isfinite(value)):
        raise ValueError(f"field {index + 1} is {parts[index]!r}, not "
                         f"{'an integer' if kind is int else 'a finite number'}")
    return value


def _face_tid_mid_row(parts: list[str]) -> tuple[str, int, int]:
    _fields(parts, 3)
    return parts[0], _field(parts, 1, int), _field(parts, 2, int)


def _landmarks_row(parts: list[str]) -> tuple[str, list[float]]:
    _fields(parts, 12)
    return parts[0], [_field(parts, i, float) for i in range(1, 12)]


def _read_face_tid_mid(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    rows = _parse_rows(path, _lines(path), _face_tid_mid_row, "'image template_id media_id'")
    names = [row[0] for row in rows]
    table = np.asarray([row[1:] for row in rows], dtype=np.int64).reshape(-1, 2)
    return names, table[:, 0].copy(), table[:, 1].copy()


def _read_landmarks(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    rows = _parse_rows(path, _lines(path), _landmarks_row,
                       "'image x1 y1 ... x5 y5 faceness' (12 fields)")
    values = np.asarray([row[1] for row in rows], dtype=np.float32).reshape(-1, 11)
    return ([row[0] for row in rows], np.ascontiguousarray(values[:, :10]).reshape(-1, 5, 2),
            values[:, 10].copy())


def read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(t1, t2, label)`` of a template pair file; parsed in C, re-read by line on error."""
    text = _require(path).read_text()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = np.fromstring(text, dtype=np.int64, sep=" ")
    except ValueError:  # a malformed token: the line-by-line pass below names it
        values = np.empty(0, dtype=np.int64)
    line_count = text.count("\n") + (not text.endswith("\n")) - text.count("\n\n")
    if values.size == 3 * line_count:  # otherwise some line is malformed: find it line by line
        table = values.reshape(-1, 3)
        return table[:, 0].copy(), table[:, 1].copy(), table[:, 2].copy()
    rows = _parse_rows(path, text.splitlines(),
                       lambda parts: [_field(_fields(parts, 3), i, int) for i in range(3)],
                       "'t1 t2 label'")
    table = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
    return table[:, 0].copy(), table[:, 1].copy(), table[:, 2].copy()


def _read_template_subjects(path: Path, known: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """Unique ``(template ids, subject ids)`` of a 1:N CSV (a template lists one subject);
    every template must be in ``known`` (the template table)."""
    subject_of: dict[int, int] = {}
    for number, line in enumerate(_lines(path)[1:], 2):
        if not line.strip():
            continue
        parts = line.split(",")
        try:
            if len(parts) < 2:
                raise ValueError(f"the line has {len(parts)} field")
            template, subject = _field(parts, 0, int), _field(parts, 1, int)
        except ValueError as err:
            raise EvalDataError(f"{path}:{number}: expected 'TEMPLATE_ID,SUBJECT_ID,...'; "
                                f"{err}") from None
        if template not in known:
            raise EvalDataError(f"{path}:{number}: template {template} is not in the template table")
        if subject_of.setdefault(template, subject) != subject:
            raise EvalDataError(f"{path}:{number}: template {template} listed with two subjects")
    ids = np.asarray(sorted(subject_of), dtype=np.int64)
    return ids, np.asarray([subject_of[t] for t in ids.tolist()], dtype=np.int64)


def _check_templates_known(path: Path, wanted: np.ndarray, known: np.ndarray, what: str) -> None:
    missing = ~np.isin(wanted, known)
    if missing.any():
        index = int(np.argmax(missing))
        raise EvalDataError(f"{path}:{index + 1}: {what} template {int(wanted[index])} "
                            "is not in the template table")


def load_ijb_meta(root: str | Path, name: str, check_images: bool = True) -> IJBMeta:
    """Read and cross-check the protocol files of IJB set ``name`` under ``root`` (see module doc)."""
    root = Path(root)
    meta, lower = root / "meta", name.lower()
    tid_file = meta / f"{lower}_face_tid_mid.txt"
    lmk_file = meta / f"{lower}_name_5pts_score.txt"
    pair_file = meta / f"{lower}_template_pair_label.txt"
    names, templates, medias = _read_face_tid_mid(tid_file)
    lmk_names, landmarks, faceness = _read_landmarks(lmk_file)
    if len(lmk_names) != len(names):
        raise EvalDataError(f"{lmk_file}: {len(lmk_names)} images but {tid_file} lists {len(names)}")
    for number, (a, b) in enumerate(zip(names, lmk_names), 1):
        if a != b:
            raise EvalDataError(f"{lmk_file}:{number}: image {b!r} where {tid_file} has {a!r}")
    paths = [str(root / "loose_crop" / n) for n in names]
    if check_images:
        for number, path in enumerate(paths, 1):
            if not Path(path).is_file():
                raise EvalDataError(f"{tid_file}:{number}: image {names[number - 1]} not found "
                                    f"under {root / 'loose_crop'}")
    t1, t2, labels = read_pairs(pair_file)
    _check_templates_known(pair_file, t1, templates, "t1")
    _check_templates_known(pair_file, t2, templates, "t2")
    result = IJBMeta(name, paths, landmarks, faceness, templates, medias, t1, t2, labels)
    gallery_names = ("S1", "S2") if lower == "ijbb" else ("G1", "G2")
    gallery_files = [meta / f"{lower}_1N_gallery_{g}.csv" for g in gallery_names]
    probe_file = meta / f"{lower}_1N_probe_mixed.csv"
    if probe_file.exists() or any(f.exists() for f in gallery_files):
        known = set(np.unique(templates).tolist())
        for gallery, file in zip(gallery_names, gallery_files):
            result.galleries[gallery] = _read_template_subjects(file, known)
        result.probes = _read_template_subjects(probe_file, known)
    return result
