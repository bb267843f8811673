"""The teacher-cache tests' run settings and their float32 cache of the synthetic set, built
once for the package.

One process, the synthetic set (192 samples), the session's random IResNet-18 teacher (width
1/8, 32-d) and per-rank batch 8, on one thread like a torchrun worker."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from fr_distill.config import load_config
from fr_distill.data import preflight
from fr_distill.checkpoint import files as checkpoint
from fr_distill.teacher_cache import CacheError, check_cache
from fr_distill.engine.cache_teacher import build_cache


STEPS = 30  # 24 steps per epoch: the runs cross an epoch boundary
SHARD = 50  # samples per shard: 4 shards, the last one short


def overrides(data: Path, teacher: Path, *extra: str) -> list[str]:
    return [f"data.train={data / 'train'}", "data.loader=torch", "data.num_workers=0",
            "data.batch_size=8", "model.width=0.125", "model.embedding_dim=32",
            "precision.amp=fp32", "loss.iled.weight=1", "loss.rpsd.weight=1",
            f"teacher.path={teacher}", "teacher.name=iresnet18", "teacher.width=0.125",
            "teacher.embedding_dim=32", "teacher.cache_dtype=float32",
            "logging.tensorboard=false", f"schedule.total_steps={STEPS}",
            "checkpoint.every_steps=10", "checkpoint.keep_last=5", *extra]


@pytest.fixture(scope="package")
def cache(synthetic_data, teacher_file, tmp_path_factory) -> Path:
    """A float32 cache of the synthetic set (both flips) built in this process."""
    directory = tmp_path_factory.mktemp("cache") / "fp32"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    build_cache(load_config(None, overrides(synthetic_data, teacher_file,
                                            f"teacher.cache={directory}")), shard_samples=SHARD)
    torch.set_num_threads(before)
    return directory


def final(run_dir: Path, step: int = STEPS) -> dict:
    return checkpoint.load(run_dir / "checkpoints" / f"step_{step:08d}.pt")


def check(data: Path, teacher: Path, directory: Path, *extra: str) -> dict:
    cfg = load_config(None, overrides(data, teacher, f"teacher.cache={directory}", *extra))
    return check_cache(cfg, preflight(cfg.data), torch.device("cpu"), cfg.data.batch_size)


def refusal(data: Path, teacher: Path, directory: Path, *extra: str) -> str:
    with pytest.raises(CacheError) as err:
        check(data, teacher, directory, *extra)
    assert err.value.exit_code == 2
    return str(err.value)


def write_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    return path


def copy_of(cache: Path, directory: Path) -> Path:
    shutil.copytree(cache, directory, ignore=shutil.ignore_patterns(".lock"))
    return directory
