"""``build_train_loader``: the sampler plus the DALI or PyTorch input path behind one interface.

``TrainLoader.iterate(start_step)`` yields :class:`Batch` for global steps ``start_step,
start_step + 1, …`` forever (epoch = step // steps_per_epoch); resuming a run is
``iterate(step)``. Labels come from the pre-flight index, looked up by the data-set indices
the pipeline actually produced; those indices and the mirror flags it actually applied are
checked against the sampler every step and handed on with the batch (a teacher-embedding
cache looks its rows up with them, :mod:`fr_distill.teacher_cache`); each
batch's labels are checked against the class count on the host, before they go to the
device (an out-of-range label there would be a device-side assert, not an error).
"""
from __future__ import annotations

import importlib.util
from typing import Iterator, NamedTuple

import numpy as np
import torch

from .dali import dali_batches
from .dataset import DatasetInfo, SampleBytes
from .errors import DataError
from .sampler import GlobalSampler
from .torch_loader import torch_batches


class Batch(NamedTuple):
    """One rank's slice of a global batch: images float32 [B,3,112,112] and int64 labels on the
    device; on the CPU the int64 data-set indices and the bool horizontal-flip flags applied."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    flips: torch.Tensor


def dali_available() -> bool:
    """Whether NVIDIA DALI is installed (checked without importing it)."""
    return importlib.util.find_spec("nvidia.dali") is not None


def select_backend(loader: str) -> str:
    """``dali`` or ``torch`` for the ``data.loader`` setting (``auto``: DALI when installed)."""
    if loader == "auto":
        return "dali" if dali_available() else "torch"
    if loader == "dali" and not dali_available():
        raise DataError("data.loader is 'dali' but nvidia.dali is not installed "
                        "(pip install fr_distill[dali], or set data.loader=torch)")
    return loader


class TrainLoader:
    """Seeded, world-size-invariant, resumable training batches for one rank.

    ``sampler`` is a :class:`GlobalSampler`, or any order with its ``rank_indices``,
    ``flips``, ``global_batch`` and ``steps_per_epoch`` (the teacher cache's sweep)."""

    def __init__(self, info: DatasetInfo, sampler: GlobalSampler, backend: str, rank: int,
                 world_size: int, device: torch.device, num_workers: int, prefetch: int) -> None:
        self.info, self.sampler, self.backend = info, sampler, backend
        self.rank, self.world_size, self.device = rank, world_size, device
        self.num_workers, self.prefetch = num_workers, prefetch
        self.steps_per_epoch = sampler.steps_per_epoch
        self.global_batch = sampler.global_batch
        self.batch_size = sampler.global_batch // world_size

    def iterate(self, start_step: int = 0) -> Iterator[Batch]:
        """Batches of global steps ``start_step, start_step + 1, …`` (infinite)."""
        batches = dali_batches if self.backend == "dali" else torch_batches
        source = batches(SampleBytes(self.info), self.sampler, start_step, self.rank,
                         self.world_size, self.device, self.num_workers, self.prefetch)
        for step, (images, indices, flips) in enumerate(source, start_step):
            expected = self.sampler.rank_indices(step, self.rank, self.world_size)
            if not np.array_equal(indices.numpy(), expected) or not np.array_equal(
                    flips.numpy(), self.sampler.flips(step, expected)):
                raise RuntimeError(f"{self.backend} loader produced samples or flips out of the "
                                   f"sampler's order at step {step}")
            labels = self.info.labels[indices.numpy()]
            outside = (labels < 0) | (labels >= self.info.num_classes)
            if outside.any():
                first = int(np.flatnonzero(outside)[0])
                raise DataError(f"{self.info.root}: sample {int(indices[first])} has label "
                                f"{int(labels[first])}, outside [0, {self.info.num_classes})")
            yield Batch(images, torch.from_numpy(labels).to(self.device, non_blocking=True),
                        indices, flips)

    def state_dict(self) -> dict:
        """The order's identity, stored in checkpoints next to the step."""
        return {**self.sampler.state_dict(), "format": self.info.format}


def build_train_loader(data_cfg, info: DatasetInfo, rank: int, world_size: int,
                       device: torch.device | str, seed: int) -> TrainLoader:
    """The training loader of one rank; the global batch is ``data_cfg.batch_size * world_size``."""
    sampler = GlobalSampler(info.num_samples, data_cfg.batch_size * world_size, seed,
                            flip=data_cfg.flip)
    return TrainLoader(info, sampler, select_backend(data_cfg.loader), rank, world_size,
                       torch.device(device), data_cfg.num_workers, data_cfg.prefetch)
