"""A folder of aligned faces as a verification set in the `.bin` layout (METHOD V1).

The folder holds one sub-folder per identity of aligned 112×112 face images (JPEG or PNG, as
written by ``tools/align_faces.py``). Its pairs are either

* **generated**: every genuine pair — the ``n(n-1)/2`` pairs of each identity's images in
  sorted file order — plus ``impostors`` impostor pairs (default: as many as genuine pairs)
  drawn uniformly without replacement, with ``numpy.random.default_rng(seed)``, from the pairs
  of images of two different identities. The two kinds are interleaved evenly (pair ``k`` of a
  kind of ``m`` pairs sits at position ``(k + 0.5) / m`` of the set), so each of the 10
  contiguous folds of the V1 protocol holds both kinds in the set's proportion. An identity
  with one image forms no genuine pair; it takes part in impostor pairs only (its count is
  logged).
* **listed** in LFW's ``pairs.txt`` format: a header line ``N_folds N_per_fold`` (or one count
  ``N``), then ``N_folds`` times ``N_per_fold`` matched lines ``name i j`` followed by as many
  mismatched lines ``name1 i name2 j``; image ``i`` of ``name`` is ``name/name_%04d.jpg``.
  A path leading out of the folder (``../x``, ``/x``) is refused, naming the line.
  The pairs keep the file's order, so the V1 folds are LFW's folds.

:func:`folder_pair_set` returns the set as a :class:`~fr_distill.eval.verification.PairSet`:
the files' bytes in pair order, exactly what ``tools/folder2bin.py`` writes into a `.bin`, so
evaluating the folder and evaluating its `.bin` give the same metrics. Every image a pair uses
is decoded once first: a missing, unreadable, undecodable or unaligned file is one
:class:`EvalDataError` line naming it, before any model runs.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fr_distill import dist
from fr_distill.paths import read_regular

from .errors import EvalDataError
from .imageio import decode_image, read_image_bytes
from .verification import ALIGNED_SIZE, MIN_PAIRS, PairSet

LOG = logging.getLogger("fr_distill")
LFW_IMAGE_NAME = "{name}/{name}_{index:04d}.jpg"

Pair = tuple[str, str, bool]
"""Two image paths relative to the folder, and whether they show the same identity."""


def list_identities(root: str | os.PathLike) -> dict[str, list[str]]:
    """``{identity: [image paths relative to root, sorted]}`` of the sorted identity folders.

    Hidden entries (names starting with ``.``) are ignored; a file beside the identity folders
    or an identity folder without images is refused, as is a folder without identities.
    """
    root = Path(root)
    if not root.is_dir():
        raise EvalDataError(f"{root}: not a folder of identity sub-folders")
    identities: dict[str, list[str]] = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise EvalDataError(f"{root / entry.name}: file outside any identity folder "
                                f"({root} must hold one sub-folder per identity)")
        files = sorted(f.name for f in os.scandir(entry.path)
                       if not f.name.startswith(".") and not f.is_dir())
        if not files:
            raise EvalDataError(f"{root / entry.name}: identity folder holds no images")
        identities[entry.name] = [f"{entry.name}/{name}" for name in files]
    if not identities:
        raise EvalDataError(f"{root}: empty folder, expected one sub-folder of aligned face "
                            f"images per identity")
    return identities


def genuine_pairs(identities: dict[str, list[str]]) -> list[Pair]:
    """Every pair of two images of one identity: identities in order, then ``(i, j)``, ``i < j``."""
    return [(files[i], files[j], True) for files in identities.values()
            for i in range(len(files)) for j in range(i + 1, len(files))]


def impostor_pair_count(identities: dict[str, list[str]]) -> int:
    """How many pairs of images of two different identities the folder holds."""
    sizes = np.array([len(files) for files in identities.values()], dtype=np.int64)
    return int((sizes.sum() ** 2 - (sizes ** 2).sum()) // 2)


def sample_impostor_pairs(identities: dict[str, list[str]], count: int, seed: int) -> list[Pair]:
    """``count`` distinct impostor pairs, uniform over all of them, reproducible from ``seed``.

    Image index pairs ``(a, b)`` are drawn uniformly from ``default_rng(seed)``; a draw of two
    images of one identity, or of a pair already drawn, is rejected. Each pair lists its
    images in folder order.
    """
    available = impostor_pair_count(identities)
    if count > available:
        raise EvalDataError(f"{count} impostor pairs asked for, but the folder's identities "
                            f"form only {available}")
    files = [f for names in identities.values() for f in names]
    labels = np.repeat(np.arange(len(identities)), [len(names) for names in identities.values()])
    rng = np.random.default_rng(seed)
    chosen: dict[tuple[int, int], None] = {}
    while len(chosen) < count:
        draws = rng.integers(0, len(files), size=(2 * (count - len(chosen)) + 16, 2))
        for a, b in draws.tolist():
            if labels[a] != labels[b]:
                chosen.setdefault((min(a, b), max(a, b)), None)
                if len(chosen) == count:
                    break
    return [(files[a], files[b], False) for a, b in chosen]


def interleave(first: Sequence[Pair], second: Sequence[Pair]) -> list[Pair]:
    """Both lists merged in their own orders, each spread evenly over the result."""
    keyed = [((k + 0.5) / len(first), 0, pair) for k, pair in enumerate(first)]
    keyed += [((k + 0.5) / len(second), 1, pair) for k, pair in enumerate(second)]
    return [pair for *_, pair in sorted(keyed, key=lambda item: item[:2])]


def generated_pairs(root: str | os.PathLike, impostors: int | None = None,
                    seed: int = 0) -> list[Pair]:
    """Every genuine pair of the folder and ``impostors`` sampled impostor pairs (see module doc)."""
    identities = list_identities(root)
    singles = [name for name, files in identities.items() if len(files) == 1]
    if singles and dist.is_main():
        LOG.warning("%s: %d of %d identities hold one image (e.g. %s): they form no genuine "
                    "pair, only impostor pairs", root, len(singles), len(identities), singles[0])
    genuine = genuine_pairs(identities)
    if not genuine:
        raise EvalDataError(f"{root}: no identity holds two images, so there is no genuine pair")
    count = len(genuine) if impostors is None else impostors
    if count < 1:
        raise EvalDataError(f"{root}: impostor pairs must number at least 1, got {count}")
    return interleave(genuine, sample_impostor_pairs(identities, count, seed))


def _pairs_header(line: str, where: str) -> int:
    """The number of matched (= mismatched) pairs an LFW ``pairs.txt`` header line announces."""
    fields = line.split()
    if not 1 <= len(fields) <= 2 or not all(f.isdigit() and int(f) > 0 for f in fields):
        raise EvalDataError(f"{where}: header must be 'N_folds N_per_fold' or a count N, "
                            f"got '{line.strip()}'")
    return int(np.prod([int(f) for f in fields]))


def _outside(file: str) -> bool:
    """Whether the relative path ``file`` leads out of its folder (absolute, or ``..`` once
    normalized)."""
    normal = os.path.normpath(file)
    return os.path.isabs(normal) or normal.split(os.sep)[0] == os.pardir


def read_pairs_file(path: str | os.PathLike, root: str | os.PathLike) -> list[Pair]:
    """The pairs of an LFW ``pairs.txt`` (see module doc), in file order; each file must exist."""
    path, root = Path(path), Path(root)
    try:
        lines = read_regular(path).decode().splitlines()
    except OSError as err:
        raise EvalDataError(f"{path}: cannot read the pairs list ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise EvalDataError(f"{path}: cannot read the pairs list ({err})") from None
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise EvalDataError(f"{path}: empty pairs list")
    per_kind = _pairs_header(numbered[0][1], f"{path}:{numbered[0][0]}")
    pairs: list[Pair] = []
    for number, line in numbered[1:]:
        fields = line.split()
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            name, i, j = fields
            pair = (LFW_IMAGE_NAME.format(name=name, index=int(i)),
                    LFW_IMAGE_NAME.format(name=name, index=int(j)), True)
        elif len(fields) == 4 and fields[1].isdigit() and fields[3].isdigit():
            name1, i, name2, j = fields
            pair = (LFW_IMAGE_NAME.format(name=name1, index=int(i)),
                    LFW_IMAGE_NAME.format(name=name2, index=int(j)), False)
        else:
            raise EvalDataError(f"{path}:{number}: expected 'name i j' (matched) or "
                                f"'name1 i name2 j' (mismatched), got '{line.strip()[:200]}'")
        for file in pair[:2]:
            if _outside(file):
                raise EvalDataError(f"{path}:{number}: image {file[:200]} is outside {root} "
                                    f"(a pairs list names images inside the folder)")
            if not (root / file).exists():
                raise EvalDataError(f"{path}:{number}: image {root / file} does not exist")
        pairs.append(pair)
    matched = sum(same for *_, same in pairs)
    if (matched, len(pairs) - matched) != (per_kind, per_kind):
        raise EvalDataError(f"{path}: the header announces {per_kind} matched and {per_kind} "
                            f"mismatched pairs, the file lists {matched} and {len(pairs) - matched}")
    return pairs


def read_aligned_images(root: str | os.PathLike, files: Sequence[str]) -> dict[str, bytes]:
    """The bytes of each of ``files`` (relative to ``root``), each checked to decode to an
    aligned 112×112 face."""
    payloads = {}
    for file in files:
        path = Path(root) / file
        payload = read_image_bytes(str(path))
        height, width = decode_image(payload, str(path), "image").shape[:2]
        if (height, width) != ALIGNED_SIZE:
            raise EvalDataError(f"{path}: image is {width}x{height}, expected an aligned "
                                f"{ALIGNED_SIZE[1]}x{ALIGNED_SIZE[0]} face (align loose images "
                                f"with tools/align_faces.py)")
        payloads[file] = payload
    return payloads


def folder_pair_set(root: str | os.PathLike, pairs_file: str | os.PathLike | None = None,
                    impostors: int | None = None, seed: int = 0) -> PairSet:
    """The folder's verification set (see module doc), named after the folder.

    ``pairs_file``: an LFW ``pairs.txt``; without it the pairs are generated with
    ``impostors`` impostor pairs (default: as many as genuine pairs) drawn with ``seed``.
    """
    root = Path(root)
    pairs = read_pairs_file(pairs_file, root) if pairs_file is not None else \
        generated_pairs(root, impostors, seed)
    if len(pairs) < MIN_PAIRS:
        raise EvalDataError(f"{pairs_file or root}: {len(pairs)} pairs, the 10-fold protocol "
                            f"needs at least {MIN_PAIRS}")
    images = read_aligned_images(root, sorted({f for a, b, _ in pairs for f in (a, b)}))
    payloads = [images[file] for a, b, _ in pairs for file in (a, b)]
    issame = np.array([same for *_, same in pairs], dtype=bool)
    digest = hashlib.sha1()
    for a, b, same in pairs:
        digest.update(images[a] + images[b] + bytes([same]))
    return PairSet(root.name, str(root), payloads, issame, f"{root.resolve()}@{digest.hexdigest()}")
