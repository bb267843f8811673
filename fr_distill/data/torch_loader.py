"""PyTorch fallback input path: DataLoader workers decode (simplejpeg/PIL) in the sampler's order.

Used when DALI is not installed or ``data.loader: torch``. Workers return uint8 HWC pixels
(already flipped by the sampler's flag); the normalization ``(x/255-0.5)/0.5`` to CHW float
runs on the rank's device, so the output matches the DALI path.

Workers start from a fork server (:func:`worker_context`), not by forking this process: a
process that already runs other native threads (DALI's, CUDA's, the math libraries') can
hold a lock at the moment of a fork, and the forked worker then waits on it forever.
"""
from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .dataset import SampleBytes
from .decode import decode_rgb
from .errors import DataError, from_worker
from .sampler import GlobalSampler


class _StepBatches(Sampler):
    """Yields, for global steps ``start_step, start_step+1, …``, this rank's (index, flip) list."""

    def __init__(self, sampler: GlobalSampler, start_step: int, rank: int, world_size: int):
        self.sampler, self.start_step = sampler, start_step
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        step = self.start_step
        while True:
            indices = self.sampler.rank_indices(step, self.rank, self.world_size)
            flips = self.sampler.flips(step, indices)
            yield list(zip(indices.tolist(), flips.tolist()))
            step += 1


class _DecodedImages(Dataset):
    """``dataset[(index, flip)]`` → (uint8 HWC tensor, index, flip)."""

    def __init__(self, images: SampleBytes):
        self.images = images

    def __getitem__(self, item: tuple[int, bool]) -> tuple[torch.Tensor, int, bool]:
        index, flip = item
        pixels = decode_rgb(self.images[index], self.images.name(index))
        if flip:
            pixels = pixels[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(pixels)), index, flip


def normalize(pixels_nhwc: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 NHWC → float32 NCHW ``(x - 127.5) / 127.5`` on ``device``."""
    x = pixels_nhwc.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    return x.sub_(127.5).div_(127.5).contiguous()


def worker_context():
    """The ``forkserver`` start method, its server preloading this module (and torch), so a
    worker starts in about a fork's time without inheriting another thread's lock."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def torch_batches(images: SampleBytes, sampler: GlobalSampler, start_step: int, rank: int,
                  world_size: int, device: torch.device, num_workers: int, prefetch: int
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Infinite (images float32 NCHW on ``device``, indices int64, flips bool) for steps from
    ``start_step``."""
    loader = DataLoader(_DecodedImages(images),
                        batch_sampler=_StepBatches(sampler, start_step, rank, world_size),
                        num_workers=num_workers,
                        multiprocessing_context=worker_context() if num_workers > 0 else None,
                        prefetch_factor=prefetch if num_workers > 0 else None,
                        pin_memory=device.type == "cuda")
    batches = iter(loader)
    for step in itertools.count(start_step):
        try:
            pixels, indices, flips = next(batches)
        except DataError as err:  # re-raised from a worker with its traceback in the text
            raise from_worker(err, f"{images.root}: loading step {step} failed") from None
        yield normalize(pixels, device), indices.to(torch.int64), flips.to(torch.bool)
