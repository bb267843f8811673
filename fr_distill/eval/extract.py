"""Sharded, resumable, flip-fused feature extraction (METHOD V1, V2).

The images of a set are cut into fixed-size shards; rank ``r`` of ``W`` extracts the
contiguous run of shards ``[r·S/W, (r+1)·S/W)``. Each image's feature is
``e(img) + e(flip(img))`` (float32, unnormalized: V1 normalizes it, V2 weights it by
faceness), computed under autocast on a GPU. With a cache directory every finished shard is
written atomically as ``feats_<start>-<stop>.npy`` (image range), so an interrupted run
recomputes only the shards it had not finished. The features of all ranks are gathered to
every rank in image order.

Image sources give uint8 ``[B, 3, 112, 112]`` RGB batches: :class:`EncodedImages` (the
encoded images of a `.bin`, decoded lazily so each rank decodes only its share),
:class:`AlignedImages` (loose crops aligned from five landmarks with
:func:`fr_distill.data.align.align_face`) and
:class:`fr_distill.eval.dali_align.DaliAlignedImages` (the same with DALI, on GPUs).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from fr_distill import dist
from fr_distill.data.align import align_face
from fr_distill.paths import atomic_writer
from fr_distill.precision import autocast

from .errors import EvalDataError
from .imageio import decode_image, read_image

SHARD_SIZE = 2048


class ImageSource(Protocol):
    """Random access to a set's images as uint8 ``[B, 3, H, W]`` RGB."""

    def __len__(self) -> int: ...

    def load(self, start: int, stop: int) -> np.ndarray: ...


class EncodedImages:
    """Encoded images (a `.bin`'s ``bins``) decoded on demand; sizes checked against ``image_size``."""

    def __init__(self, payloads: Sequence[bytes], path: str, image_size: tuple[int, int] = (112, 112)):
        self.payloads, self.path, self.image_size = payloads, path, image_size

    def __len__(self) -> int:
        return len(self.payloads)

    def load(self, start: int, stop: int) -> np.ndarray:
        height, width = self.image_size
        out = np.empty((stop - start, 3, height, width), dtype=np.uint8)
        for offset, index in enumerate(range(start, stop)):
            image = decode_image(self.payloads[index], self.path, f"image {index}")
            if image.shape[:2] != (height, width):
                raise EvalDataError(f"{self.path}: image {index} is {image.shape[1]}x"
                                    f"{image.shape[0]}, expected {width}x{height}")
            out[offset] = image.transpose(2, 0, 1)
        return out


class AlignedImages:
    """Loose face crops aligned onto the ArcFace template from their five landmarks (METHOD V2)."""

    def __init__(self, paths: Sequence[str], landmarks: np.ndarray, size: int = 112):
        self.paths, self.landmarks, self.size = paths, landmarks, size

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, 3, self.size, self.size), dtype=np.uint8)
        for offset, index in enumerate(range(start, stop)):
            image = read_image(self.paths[index])
            out[offset] = align_face(image, self.landmarks[index], self.size).transpose(2, 0, 1)
        return out


def shard_bounds(count: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), …]`` of the fixed-size shards covering ``count`` images."""
    return [(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]


def rank_shards(shards: list, rank: int, world_size: int) -> list:
    """The contiguous run of ``shards`` that ``rank`` extracts."""
    return shards[rank * len(shards) // world_size:(rank + 1) * len(shards) // world_size]


@torch.no_grad()
def embed_flip_fused(model: torch.nn.Module, images: np.ndarray, device: torch.device,
                     amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``e(x) + e(flip(x))`` for a uint8 ``[B, 3, H, W]`` batch, float32 on ``device``; the
    forward runs under autocast to ``amp_dtype``, or in float32 when it is ``None``."""
    batch = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True)
    batch = batch.float().div_(255).sub_(0.5).div_(0.5)
    both = torch.cat([batch, batch.flip(3)])
    with autocast(device, amp_dtype):  # amp_dtype None: float32, autocast off
        out = model(both)
    out = out.float()
    return out[: len(batch)] + out[len(batch):]


def _shard_file(cache_dir: Path, start: int, stop: int) -> Path:
    return cache_dir / f"feats_{start:09d}-{stop:09d}.npy"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_writer(path) as handle:
        np.save(handle, array)


def prepare_cache(cache_dir: str | Path, key: dict) -> Path:
    """Create ``cache_dir`` for features identified by ``key`` (model, set, options).

    Shards cached under a different key are removed (rank 0), so a cache never mixes
    features of two models. Call on every rank; returns the directory.
    """
    directory = Path(cache_dir)
    if dist.is_main():
        directory.mkdir(parents=True, exist_ok=True)
        key_file = directory / "key.json"
        if not key_file.exists() or json.loads(key_file.read_text()) != key:
            for stale in directory.glob("feats_*.npy"):
                stale.unlink()
            key_file.write_text(json.dumps(key, sort_keys=True))
    dist.barrier()
    return directory


def extract_features(model: torch.nn.Module, source: ImageSource, device: torch.device | str,
                     batch_size: int = 128, amp_dtype: torch.dtype | None = None,
                     cache_dir: str | Path | None = None, shard_size: int = SHARD_SIZE,
                     progress: bool = True, desc: str = "features") -> torch.Tensor:
    """Flip-fused features ``[N, D]`` (float32, CPU) of ``source``, on every rank.

    Sharded over ranks, cached per shard in ``cache_dir`` when given (see module doc). The
    number of shards this rank computed rather than read from the cache is recorded in
    :data:`last_run`.
    """
    device = torch.device(device)
    shards = rank_shards(shard_bounds(len(source), shard_size), dist.rank(), dist.world_size())
    directory = Path(cache_dir) if cache_dir is not None else None
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    parts, computed = [], 0
    bar = tqdm(total=sum(stop - start for start, stop in shards), desc=desc, unit="img",
               disable=not (progress and dist.is_main()), leave=False)
    with bar:  # closed (its line cleared) also when an image fails, before the message
        for start, stop in shards:
            cached = _shard_file(directory, start, stop) if directory is not None else None
            if cached is not None and cached.exists():
                parts.append(torch.from_numpy(np.load(cached)))
            else:
                feats = [embed_flip_fused(model, source.load(lo, min(lo + batch_size, stop)),
                                          device, amp_dtype).cpu()
                         for lo in range(start, stop, batch_size)]
                parts.append(torch.cat(feats))
                computed += 1
                if cached is not None:
                    _save_atomic(cached, parts[-1].numpy())
            bar.update(stop - start)
    last_run["computed_shards"] = computed
    return _gather_rows(parts, device)


last_run: dict[str, int] = {"computed_shards": 0}
"""Shards this process computed (rather than read from its cache) in its last extraction."""


def _gather_rows(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Concatenate every rank's rows (rank order) on every rank; float32 CPU."""
    local = torch.cat(parts) if parts else None
    sizes = dist.all_gather_object((0, 0) if local is None else tuple(local.shape))
    dim = max(size[1] for size in sizes)
    if dim == 0:
        raise ValueError("extract_features: no images to extract")
    if dist.world_size() == 1:
        return local
    most = max(size[0] for size in sizes)
    padded = torch.zeros(most, dim, dtype=torch.float32, device=device)
    if local is not None:
        padded[: len(local)] = local.to(device)
    gathered = dist.all_gather_cat(padded).cpu()
    return torch.cat([gathered[r * most: r * most + sizes[r][0]] for r in range(len(sizes))])
