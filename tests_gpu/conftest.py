"""GPU-only tests: run by ``tools/gpu_check.sh`` (``pytest tests_gpu -m gpu``), never by
``make test``, whose ``testpaths`` is ``tests/``. Without a visible CUDA device the session
stops with a usage error instead of skipping: a GPU check that skips has checked nothing."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (tests_gpu/, tools/gpu_check.sh)")
    if not torch.cuda.is_available():
        raise pytest.UsageError("tests_gpu/ needs a CUDA GPU, and torch.cuda.is_available() is "
                                "False (driver, CUDA_VISIBLE_DEVICES or a CPU-only torch)")


def smooth_face_like(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth RGB uint8 image, darker on its left side (so a mirror flip is visible)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    a, b, c = rng.uniform(0.02, 0.08, 3)
    channels = [127 + 100 * np.sin(a * xx + b * yy + k + c) for k in range(3)]
    image = np.stack(channels, -1)
    image[:, : width // 3] *= 0.4
    return np.clip(image, 0, 255).astype(np.uint8)


def write_jpeg_folder(root: Path, num_classes: int, per_class: int) -> Path:
    """``root/id{c}/{k}.jpg``: 112×112 JPEGs, 4:4:4 (no chroma subsampling), quality 95."""
    for c in range(num_classes):
        (root / f"id{c:03d}").mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(smooth_face_like(112, 112, seed=c * 100 + k)).save(
                root / f"id{c:03d}" / f"{k}.jpg", quality=95, subsampling=0)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun_gpu(script: str | Path, *args: str, nproc: int = 1,
                     timeout: float = 300) -> subprocess.CompletedProcess:
    """``script`` under torchrun on this machine's GPU(s); raises with the output on failure."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script),
           *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n"
                             f"--- stderr ---\n{proc.stderr[-6000:]}")
    return proc
