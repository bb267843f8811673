"""DALI input path: a parallel external source fed by the sampler, DALI decode/flip/normalize.

Python worker processes (batch mode: each prepares whole batches) read the encoded bytes
(image folder or RecordIO, any layout the project's reader accepts, including InsightFace's
header record, or several such sets concatenated, which DALI's own one-source readers could
not mix) in the exact order of :class:`~fr_distill.data.sampler.GlobalSampler`, together
with the sampler's flip flag and the data-set index. DALI decodes (``device="mixed"`` on a
GPU, ``"cpu"`` otherwise; same graph), mirrors by the flag and normalizes
``(x - 127.5) / 127.5`` to CHW float32 in one ``crop_mirror_normalize``. Batches come out
as torch tensors on the rank's device.

Worker start: ``fork`` while CUDA is not initialized in this process (fast), else ``spawn``
(the source object is picklable; the RecordIO reader reopens its file in each worker).
Either way a worker dies with the process that built the pipeline (:func:`die_with_parent`):
DALI's workers wait for tasks in C and keep that process's Python signal handlers (the
run's SIGTERM handler only takes note), so a SIGKILLed run would otherwise leave them
running for good, holding their memory (never the run directory's lock:
:func:`~fr_distill.engine.run_dir.lock_directory`).
"""
from __future__ import annotations

import ctypes
import itertools
import os
import pickle
import signal
from typing import Iterator

import numpy as np
import torch

from .dataset import IMAGE_SIZE, SampleBytes
from .decode import decode_rgb
from .errors import DataError, from_worker
from .sampler import GlobalSampler


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up now: no dlopen in a forked child

#: While :func:`build_pipeline` starts forked workers: the pid they die with.
_forking_workers_of: int | None = None


def die_with_parent(parent_pid: int) -> None:
    """In a worker: have the kernel SIGKILL this process when ``parent_pid`` (the pipeline's
    process; strictly its thread that started the worker, the one building the pipeline)
    ends, and exit now if it already has (it died before this call)."""
    if _prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0),
              ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent_pid:
        os._exit(1)


def _in_forked_child() -> None:
    """``os.register_at_fork`` hook: a worker forked by :func:`build_pipeline` dies with its
    parent (its own children, if any, are not workers)."""
    global _forking_workers_of
    if _forking_workers_of is not None:
        parent, _forking_workers_of = _forking_workers_of, None
        die_with_parent(parent)


os.register_at_fork(after_in_child=_in_forked_child)


class SpawnPickler:
    """DALI's ``py_callback_pickler`` for spawned workers: plain pickle, and a worker
    unpickling its source (the first thing it does) first ties its life to ``parent_pid``."""

    def __init__(self, parent_pid: int) -> None:
        self.parent_pid = parent_pid

    def dumps(self, obj) -> bytes:
        return pickle.dumps(obj)

    def loads(self, data: bytes):
        die_with_parent(self.parent_pid)
        return pickle.loads(data)


class BatchSource:
    """Batch callback of the parallel external source: for batch ``info.iteration`` (global step
    ``start_step + info.iteration``) this rank's encoded images, mirror flags and indices.

    Batch mode keeps the per-image Python overhead to one file/record read; the index and flip
    arithmetic is vectorized per batch. Each worker process prepares whole batches.
    """

    def __init__(self, images: SampleBytes, sampler: GlobalSampler, start_step: int,
                 rank: int, world_size: int) -> None:
        self.images, self.sampler, self.start_step = images, sampler, start_step
        self.rank, self.world_size = rank, world_size

    def __call__(self, info) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        step = self.start_step + info.iteration
        indices = self.sampler.rank_indices(step, self.rank, self.world_size)
        flips = self.sampler.flips(step, indices).astype(np.int32)
        encoded = [np.frombuffer(self.images[i], dtype=np.uint8) for i in indices.tolist()]
        return encoded, flips, indices


def build_pipeline(source: BatchSource, batch_size: int, device: torch.device,
                   num_workers: int, prefetch: int):
    """The DALI pipeline (built) producing (images CHW float32, indices int64, mirror flags)."""
    from nvidia.dali import fn, pipeline_def, types

    on_gpu = device.type == "cuda"
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) \
        if on_gpu else None
    start_method = "spawn" if torch.cuda.is_initialized() else "fork"
    pickler = SpawnPickler(os.getpid()) if start_method == "spawn" else None

    @pipeline_def(batch_size=batch_size, num_threads=max(1, num_workers), device_id=device_id,
                  prefetch_queue_depth=prefetch, py_num_workers=max(1, num_workers),
                  py_start_method=start_method, py_callback_pickler=pickler)
    def pipeline():
        encoded, mirror, index = fn.external_source(
            source=source, num_outputs=3, batch=True, batch_info=True, parallel=True,
            prefetch_queue_depth=max(prefetch, num_workers),
            dtype=[types.UINT8, types.INT32, types.INT64])
        images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu",
                                   output_type=types.RGB)
        images = fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.FLOAT,
                                          output_layout="CHW", mean=[127.5] * 3, std=[127.5] * 3)
        return images, index, mirror

    global _forking_workers_of
    pipe = pipeline()
    _forking_workers_of = os.getpid()  # build() starts the workers
    try:
        pipe.build()
    finally:
        _forking_workers_of = None
    return pipe


def _find_undecodable(images: SampleBytes, sampler: GlobalSampler, steps: range, rank: int,
                      world_size: int) -> DataError | None:
    """The error naming the first sample of ``steps`` that the CPU decoder rejects (DALI's own
    decoder errors do not say which file failed)."""
    for step in steps:
        for index in sampler.rank_indices(step, rank, world_size).tolist():
            try:
                decode_rgb(images[index], images.name(index))
            except DataError as err:
                return err
    return None


def dali_batches(images: SampleBytes, sampler: GlobalSampler, start_step: int, rank: int,
                 world_size: int, device: torch.device, num_workers: int, prefetch: int
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Infinite (images float32 NCHW on ``device``, indices int64, flips bool: the mirror flags
    the pipeline applied) for steps from ``start_step``."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    per_rank = sampler.global_batch // world_size
    pipe = build_pipeline(BatchSource(images, sampler, start_step, rank, world_size),
                          per_rank, device, num_workers, prefetch)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    try:
        for step in itertools.count():
            try:
                out_images, out_index, out_mirror = pipe.run()
            except Exception as err:  # worker/decoder errors arrive as multi-line text
                failed = start_step + step
                located = _find_undecodable(images, sampler, range(failed, failed + prefetch + 1),
                                            rank, world_size)
                raise located or from_worker(err, f"{images.root}: DALI pipeline failed at step "
                                                  f"{failed}") from None
            if not out_images.is_dense_tensor() or \
                    tuple(out_images.as_tensor().shape()) != (per_rank, 3, IMAGE_SIZE, IMAGE_SIZE):
                failed = start_step + step
                raise _find_undecodable(images, sampler, range(failed, failed + 1), rank, world_size) \
                    or DataError(f"{images.root}: a decoded batch at step {failed} is not "
                                 f"{IMAGE_SIZE}x{IMAGE_SIZE}")
            batch = torch.empty((per_rank, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.float32,
                                device=device)
            feed_ndarray(out_images.as_tensor(), batch, cuda_stream=stream)
            indices = torch.from_numpy(out_index.as_array().astype(np.int64).reshape(-1))
            flips = torch.from_numpy(out_mirror.as_array().reshape(-1) != 0)
            yield batch, indices, flips
    finally:
        del pipe
