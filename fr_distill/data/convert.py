"""Image folder → shuffled InsightFace RecordIO pair (``tools/folder2rec.py``)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .dataset import IMAGE_SIZE, scan
from .errors import DataError
from .recordio import RecordIOWriter


def folder_to_recordio(folder: str | os.PathLike, rec_path: str | os.PathLike, seed: int = 0,
                       insightface_header: bool = True, progress: bool = False,
                       overwrite: bool = False) -> int:
    """Write every image of ``folder`` (checked as in the pre-flight) in a seeded random order.

    With ``insightface_header`` the file starts with InsightFace's header record (images are
    ids 1..N) and a ``property`` file (``num_classes,112,112``) is written next to it; without
    it the file is a plain MXNet RecordIO (ids 0..N-1) that DALI's ``readers.mxnet`` reads.
    An existing ``.rec``/``.idx`` (or ``property``) is refused unless ``overwrite``: a data set
    may be what other runs train on. Returns the number of images written.
    """
    rec_path = Path(rec_path)
    outputs = [rec_path, rec_path.with_suffix(".idx")] + (
        [rec_path.parent / "property"] if insightface_header else [])
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not overwrite:
        raise DataError(f"{', '.join(existing)} already exist(s); remove them or pass --force "
                        f"to overwrite")
    info = scan(str(folder), "folder", check=True)
    if info.bad:
        more = f" (and {len(info.bad) - 1} more)" if len(info.bad) > 1 else ""
        raise DataError(f"{info.bad[0]}{more}; fix the folder (tools/validate_data.py) first")
    if info.num_samples == 0:
        raise DataError(f"{folder}: no images to convert")
    order = np.random.default_rng(seed).permutation(info.num_samples)
    with RecordIOWriter(rec_path, rec_path.with_suffix(".idx"),
                        header_label="auto" if insightface_header else None) as writer:
        for i in tqdm(order.tolist(), desc="folder2rec", unit="img", disable=not progress):
            data = (Path(info.root) / info.samples[i].decode()).read_bytes()
            writer.write(int(info.labels[i]), data)
    if insightface_header:
        (rec_path.parent / "property").write_text(f"{info.num_classes},{IMAGE_SIZE},{IMAGE_SIZE}")
    return info.num_samples
