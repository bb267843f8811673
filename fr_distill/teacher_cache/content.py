"""Digests of the training images' bytes, kept with a cache (``teacher.cache_verify_content``).

A cache's identity (:mod:`.identity`) covers the sample list (an image folder's relative file
names, a RecordIO index) and the labels, not the images' bytes: a folder whose images were
replaced by others under the same names reads as the same data. With
``teacher.cache_verify_content: true`` the build stores the sha256 of every sample's encoded
bytes, in sample order, in ``images.sha256`` (32 bytes a sample; the manifest's
``image_digests`` is that file's own sha256), and a run computes them again before training
and refuses the cache naming the first image that differs. It costs a read and a hash of
every image at the build and at every run start (docs/METHOD.md §4 has the measured cost).
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fr_distill.data import DatasetInfo
from fr_distill.data.dataset import SampleBytes
from fr_distill.teacher_cache.identity import CacheError
from fr_distill.teacher_cache.store import write_file

DIGESTS_FILE = "images.sha256"
DIGEST_BYTES = 32
CHUNK = 1024  # samples a thread hashes per task


def image_digests(info: DatasetInfo) -> np.ndarray:
    """``[num_samples, 32]`` uint8: the sha256 of each sample's encoded bytes (an image file, a
    RecordIO record's image), read and hashed in threads (file reads and hashlib free the GIL)."""
    images = SampleBytes(info)
    for start in info.sample_starts():  # a RecordIO reader opens its file lazily: here, once
        images[start]

    def hash_chunk(start: int) -> bytes:
        return b"".join(hashlib.sha256(images[i]).digest()
                        for i in range(start, min(start + CHUNK, len(images))))

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        data = b"".join(pool.map(hash_chunk, range(0, len(images), CHUNK)))
    return np.frombuffer(data, dtype=np.uint8).reshape(len(images), DIGEST_BYTES)


def record_digests(directory: Path, info: DatasetInfo) -> str:
    """Write ``images.sha256`` of ``info``'s images into the cache ``directory`` (atomically);
    returns the file's sha256 (the manifest's ``image_digests``)."""
    data = image_digests(info).tobytes()
    write_file(directory / DIGESTS_FILE, data)
    return hashlib.sha256(data).hexdigest()


def content_difference(directory: Path, recorded_sha256: str, info: DatasetInfo) -> str | None:
    """The refusal naming the first image of ``info`` whose bytes are not those the cache in
    ``directory`` was built from, or None when every image agrees."""
    path = directory / DIGESTS_FILE
    try:
        recorded = path.read_bytes()
    except OSError as err:
        raise CacheError(f"{path}: unreadable ({err.strerror}); the cache's image digests are "
                         f"lost: build the cache again") from None
    if (hashlib.sha256(recorded).hexdigest() != recorded_sha256
            or len(recorded) != DIGEST_BYTES * info.num_samples):
        raise CacheError(f"{path} does not match its sha256 in the manifest (image_digests): the "
                         f"file is corrupt; build the cache again")
    differs = (np.frombuffer(recorded, dtype=np.uint8).reshape(-1, DIGEST_BYTES)
               != image_digests(info)).any(axis=1)
    if not differs.any():
        return None
    first = int(differs.argmax())
    return (f"teacher.cache {directory} was built from other images: "
            f"{SampleBytes(info).name(first)} is not the image the cache was built from (its "
            f"sha256 differs; {int(differs.sum())} of {info.num_samples} images differ)")
