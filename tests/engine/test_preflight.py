"""The one pre-flight of train, ``--dry-run`` and ``cache-teacher``: the same one-line refusal
of a bad check set, and the resume checkpoint named only for a run."""
from __future__ import annotations

from pathlib import Path

import pytest

from fr_distill.config import load_config
from fr_distill.engine.cache_teacher import build_cache
from fr_distill.engine.preflight import dry_run, preflight
from fr_distill.engine.trainer import train
from fr_distill.errors import FrDistillError


def overrides(data: Path, teacher: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [f"data.train={data / 'train'}", "data.loader=torch", "data.num_workers=0",
            "data.batch_size=8", "model.width=0.125", "model.embedding_dim=32",
            f"teacher.path={teacher}", "teacher.name=iresnet18", "teacher.width=0.125",
            "teacher.embedding_dim=32", "logging.tensorboard=false",
            f"run.output_dir={tmp_path / 'run'}", *extra]


def test_train_dry_run_and_cache_teacher_refuse_a_bad_check_set_in_the_same_line(
        synthetic_data, teacher_file, tmp_path):
    damaged = tmp_path / "damaged.bin"
    damaged.write_bytes(b"not a pickle")
    cfg = load_config(None, overrides(synthetic_data, teacher_file, tmp_path,
                                      f"teacher.check_sets=[{damaged}]"))
    cache_cfg = load_config(None, overrides(synthetic_data, teacher_file, tmp_path,
                                            f"teacher.check_sets=[{damaged}]",
                                            f"teacher.cache={tmp_path / 'cache'}"))
    messages = []
    for command in (lambda: train(cfg), lambda: dry_run(cfg), lambda: build_cache(cache_cfg)):
        with pytest.raises(FrDistillError) as err:
            command()
        messages.append(str(err.value))
    assert len(set(messages)) == 1 and str(damaged) in messages[0]
    assert "\n" not in messages[0]
    assert not (tmp_path / "cache").exists()  # refused before anything was written
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_preflight_names_the_resume_checkpoint_only_for_a_run(synthetic_data, teacher_file,
                                                               tmp_path):
    cfg = load_config(None, overrides(synthetic_data, teacher_file, tmp_path))
    checked = preflight(cfg)
    assert checked.resume_path is None
    assert checked.data.num_samples > 0 and checked.data.num_classes > 0
    assert preflight(cfg, cache_build=True).data.num_samples == checked.data.num_samples
