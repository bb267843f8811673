"""Input-pipeline throughput: the project's DALI path vs. DALI's file reader vs. PyTorch + PIL.

On the same 112×112 JPEGs, the same number of CPU workers, in one run:
  * ``project_dali``   — ``build_train_loader`` with DALI (parallel external source fed by the
                         sampler, per-sample flips, normalize), batches as torch tensors;
  * ``dali_file``      — DALI's native ``readers.file`` + decode + random mirror + normalize;
  * ``torch_pil``      — PyTorch DataLoader over torchvision ``ImageFolder`` with PIL decode,
                         random flip, ToTensor, Normalize (InsightFace's ImageFolder path);
  * ``project_torch``  — the project's PyTorch fallback loader (simplejpeg decode).
On a GPU (``--device cuda``) DALI decodes with ``device="mixed"`` and every output is moved to
the GPU. The variants take turns in interleaved rounds (a load change on a shared machine
hits all alike); prints the median images/s, the median CPU time per image (this process,
its threads and worker processes: the cost on dedicated cores, robust to other load) and
the ratios; ``--json PATH`` writes them.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from fr_distill.config import DataConfig
from fr_distill.data import build_train_loader, preflight


def write_face_like_jpegs(root: Path, num_images: int, num_classes: int, seed: int = 0) -> None:
    """Smooth, face-sized 112×112 JPEGs (quality 95, a few KB each like aligned face crops)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:112, 0:112].astype(np.float32) / 112
    for i in range(num_images):
        folder = root / f"id{i % num_classes:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0.5, 6, 3)
        base = np.stack([np.sin(a * xx + b * yy + k + c) for k in range(3)], -1)
        blob = np.exp(-((xx - rng.uniform(0.3, 0.7)) ** 2 + (yy - 0.5) ** 2) * rng.uniform(5, 20))
        pixels = 127 + 60 * base + 60 * blob[..., None] + rng.normal(0, 6, (112, 112, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            folder / f"{i:06d}.jpg", quality=95)


def _cpu_seconds() -> float:
    """User+system CPU seconds of this process (all threads) and its live descendants (Linux)."""
    own = os.times()
    total = own.user + own.system
    tick = os.sysconf("SC_CLK_TCK")
    parent_of, cpu_of = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent_of[int(pid)] = int(fields[1])
        cpu_of[int(pid)] = (int(fields[11]) + int(fields[12])) / tick
    family = {os.getpid()}
    grew = True
    while grew:
        new = {pid for pid, parent in parent_of.items() if parent in family} - family
        family |= new
        grew = bool(new)
    return total + sum(cpu_of[pid] for pid in family - {os.getpid()})


def _rate(batches: Iterator, batch_size: int, skip: int, measured: int,
          sync: Callable[[], None]) -> tuple[float, float]:
    """(images per second, CPU microseconds per image) over ``measured`` batches, after ``skip``
    batches that drain what the variant prefetched while it was idle."""
    for _ in itertools.islice(batches, skip):
        pass
    sync()
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    for _ in itertools.islice(batches, measured):
        pass
    sync()
    images = measured * batch_size
    return images / (time.perf_counter() - start), (_cpu_seconds() - cpu_start) / images * 1e6


def _project(folder: Path, loader: str, batch: int, workers: int, device: torch.device) -> Iterator:
    cfg = DataConfig(train=str(folder), loader=loader, batch_size=batch, num_workers=workers)
    info = preflight(cfg)
    return build_train_loader(cfg, info, 0, 1, device, seed=0).iterate(0)


def _dali_file(folder: Path, batch: int, workers: int, device: torch.device) -> Iterator:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import feed_ndarray

    on_gpu = device.type == "cuda"

    @pipeline_def(batch_size=batch, num_threads=workers,
                  device_id=torch.cuda.current_device() if on_gpu else None, prefetch_queue_depth=2)
    def pipeline():
        encoded, labels = fn.readers.file(file_root=str(folder), random_shuffle=True, seed=0)
        images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu",
                                   output_type=types.RGB)
        images = fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(), dtype=types.FLOAT,
                                          output_layout="CHW", mean=[127.5] * 3, std=[127.5] * 3)
        return images, labels

    pipe = pipeline()
    pipe.build()
    stream = torch.cuda.current_stream() if on_gpu else None
    while True:
        images, labels = pipe.run()
        out = torch.empty((batch, 3, 112, 112), dtype=torch.float32, device=device)
        feed_ndarray(images.as_tensor(), out, cuda_stream=stream)
        yield out, torch.from_numpy(labels.as_array().reshape(-1).astype(np.int64)).to(device)


def _torch_pil(folder: Path, batch: int, workers: int, device: torch.device) -> Iterator:
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                    transforms.Normalize([0.5] * 3, [0.5] * 3)])
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(folder), transform), batch_size=batch, shuffle=True,
        num_workers=workers, drop_last=True, pin_memory=device.type == "cuda",
        persistent_workers=True)
    while True:
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="benchmark.py data", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096, help="synthetic JPEGs to generate")
    parser.add_argument("--classes", type=int, default=64)
    parser.add_argument("--folder", help="use this image folder instead of generated JPEGs")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="CPU workers/threads for every variant")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds (variants take turns; the median is reported)")
    parser.add_argument("--batches", type=int, default=10, help="measured batches per round")
    parser.add_argument("--skip", type=int, default=6,
                        help="batches dropped at the start of each round (drains prefetch)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder) if args.folder else Path(tmp) / "train"
        if not args.folder:
            write_face_like_jpegs(folder, args.images, args.classes)
        variants = {
            "project_dali": lambda: _project(folder, "dali", args.batch, args.workers, device),
            "dali_file": lambda: _dali_file(folder, args.batch, args.workers, device),
            "torch_pil": lambda: _torch_pil(folder, args.batch, args.workers, device),
            "project_torch": lambda: _project(folder, "torch", args.batch, args.workers, device),
        }
        iterators = {name: make() for name, make in variants.items()}
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for _ in range(args.rounds):  # interleaved, so load changes hit every variant alike
            for name, batches in iterators.items():
                samples[name].append(_rate(batches, args.batch, args.skip, args.batches, sync))
        for batches in iterators.values():
            batches.close()
        rates = {name: float(np.median([r for r, _ in v])) for name, v in samples.items()}
        cpu_us = {name: float(np.median([c for _, c in v])) for name, v in samples.items()}
    result = {
        "device": str(device), "batch": args.batch, "workers": args.workers,
        "rounds": args.rounds, "batches_per_round": args.batches,
        "images_per_s": {k: round(v, 1) for k, v in rates.items()},
        "cpu_us_per_image": {k: round(v, 1) for k, v in cpu_us.items()},
        "ratios": {"project_dali/torch_pil": round(rates["project_dali"] / rates["torch_pil"], 3),
                   "project_dali/dali_file": round(rates["project_dali"] / rates["dali_file"], 3),
                   "project_torch/torch_pil": round(rates["project_torch"] / rates["torch_pil"], 3)},
        # throughput per CPU: how the variants compare on the same dedicated cores
        "cpu_efficiency_ratios": {
            "project_dali/torch_pil": round(cpu_us["torch_pil"] / cpu_us["project_dali"], 3),
            "project_dali/dali_file": round(cpu_us["dali_file"] / cpu_us["project_dali"], 3)},
    }
    print(f"data pipeline throughput ({device}, batch {args.batch}, {args.workers} workers; median "
          f"of {args.rounds} interleaved rounds of {args.batches} batches)")
    print(f"{'variant':<16}{'images/s':>12}{'CPU us/image':>14}")
    for name, rate in rates.items():
        print(f"{name:<16}{rate:>12.0f}{cpu_us[name]:>14.0f}")
    for name, ratio in result["ratios"].items():
        print(f"{name + ' (images/s)':<44}{ratio:>8.2f}x")
    for name, ratio in result["cpu_efficiency_ratios"].items():
        print(f"{name + ' (images per CPU-s)':<44}{ratio:>8.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result
