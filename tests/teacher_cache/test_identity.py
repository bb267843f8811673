"""What a cache was built from: refused for another teacher, other data (one training set or
several), other preprocessing, dtype or flips, before the first training step and in the dry
run."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import write_jpeg_folder
from fr_distill.config import ConfigError, load_config
from fr_distill.data import scan
from fr_distill.engine.cache_teacher import build_cache
from fr_distill.engine.trainer import train
from fr_distill.models import get_backbone
from fr_distill.paths import file_sha256
from fr_distill.teacher_cache import CacheError
from fr_distill.teacher_cache.identity import first_difference, identity
from fr_distill.teacher_cache.store import ROWS_FILE
from .conftest import SHARD, check, overrides, refusal


def test_refuses_another_teacher_or_embedding_size(cache, synthetic_data, teacher_file, tmp_path):
    other = tmp_path / "other.pth"
    torch.manual_seed(99)
    torch.save(get_backbone("iresnet18", 32, width=0.125).state_dict(), other)
    assert refusal(synthetic_data, other, cache) == (
        f"teacher.cache {cache} was built for a teacher file with sha256 "
        f"{file_sha256(teacher_file)[:12]}…, but teacher.path {other} has "
        f"{file_sha256(other)[:12]}…")
    assert refusal(synthetic_data, teacher_file, cache, "teacher.embedding_dim=16") == (
        f"teacher.cache {cache} was built with teacher.embedding_dim=32 (embedding size), the "
        f"config has teacher.embedding_dim=16")


def test_refuses_other_data(cache, synthetic_data, teacher_file, tmp_path):
    fewer = tmp_path / "train"
    shutil.copytree(synthetic_data / "train", fewer)
    next(iter(sorted(fewer.glob("*/*.jpg")))).unlink()
    assert refusal(tmp_path, teacher_file, cache) == (
        f"teacher.cache {cache} was built for other data: its num_samples is 192, data.train "
        f"{fewer} has 191")
    renamed = tmp_path / "renamed" / "train"
    shutil.copytree(synthetic_data / "train", renamed)
    first = next(iter(sorted(renamed.glob("*/*.jpg"))))
    first.rename(first.with_name("zz_" + first.name))
    assert refusal(renamed.parent, teacher_file, cache).startswith(
        f"teacher.cache {cache} was built for other data: its digest is ")
    message = refusal(synthetic_data, teacher_file, cache,
                      f"data.train={synthetic_data / 'train.rec'}")
    assert message == (f"teacher.cache {cache} was built for other data: its format is folder, "
                       f"data.train {synthetic_data / 'train.rec'} has recordio")


def test_refuses_other_preprocessing_dtype_or_flips(cache, synthetic_data, teacher_file,
                                                    tmp_path, single_thread):
    assert refusal(synthetic_data, teacher_file, cache, "teacher.input_mean=0",
                   "teacher.input_std=1") == (
        f"teacher.cache {cache} was built with teacher.input_mean=None, teacher.input_std=None, "
        f"the config has teacher.input_mean=0.0, teacher.input_std=1.0")
    assert refusal(synthetic_data, teacher_file, cache, "data.loader=dali") == (
        f"teacher.cache {cache} was built from images decoded by torch, this run decodes with "
        f"dali-cpu (data.loader, device); decoders differ in the last bit of a pixel: build the "
        f"cache with this run's loader")
    assert refusal(synthetic_data, teacher_file, cache, "teacher.cache_dtype=float16") == (
        f"teacher.cache {cache} holds float32 rows, the config has teacher.cache_dtype=float16")
    unflipped = tmp_path / "unflipped"
    build_cache(load_config(None, overrides(synthetic_data, teacher_file,
                                            f"teacher.cache={unflipped}", "data.flip=false")),
                shard_samples=SHARD)
    assert (unflipped / ROWS_FILE).stat().st_size == 192 * 32 * 4
    assert check(synthetic_data, teacher_file, unflipped, "data.flip=false")["flips"] == [False]
    assert refusal(synthetic_data, teacher_file, unflipped) == (
        f"teacher.cache {unflipped} holds unflipped rows only (built with data.flip=false) but "
        f"this run flips its images (data.flip=true): build the cache with data.flip=true, or "
        f"set data.flip=false")


def test_a_refused_cache_stops_training_before_the_first_step(cache, synthetic_data,
                                                              teacher_file, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CacheError):
        train(load_config(None, overrides(synthetic_data, teacher_file, f"run.output_dir={out}",
                                          f"teacher.cache={cache}", "teacher.input_mean=0")))
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("checkpoints/*.pt"))
    with pytest.raises(ConfigError, match="config key 'teacher.path' is empty but teacher.cache "
                                          "is set"):
        train(load_config(None, overrides(synthetic_data, "", f"run.output_dir={out}",
                                          f"teacher.cache={cache}", "loss.iled.weight=0",
                                          "loss.rpsd.weight=0")))


def test_dry_run_checks_the_cache(cache, synthetic_data, teacher_file, tmp_path):
    from fr_distill.engine.preflight import dry_run

    base = overrides(synthetic_data, teacher_file, f"run.output_dir={tmp_path / 'run'}",
                     f"teacher.cache={cache}")
    assert f"rows read from the cache {cache} (float32, placement auto)" in dry_run(
        load_config(None, base))
    with pytest.raises(CacheError, match="holds float32 rows, the config has "
                                         "teacher.cache_dtype=float16"):
        dry_run(load_config(None, base + ["teacher.cache_dtype=float16"]))


@pytest.mark.timeout(180)
def test_teacher_cache_of_two_sets_is_refused_for_one_set_or_the_other_order(two_sets, tmp_path):
    a, b = two_sets
    c = str(write_jpeg_folder(tmp_path / "c", 4, 3))  # 12 images as a: [a, c] and [c, a] differ
    # only in the digest (the order of the labels)

    def run(train):
        cfg = load_config(None, [f"data.train={json.dumps(train)}", "data.loader=torch"])
        return cfg, identity(cfg, scan(train), torch.device("cpu"), "0" * 64, True)

    cfg, built = run([a, b])
    assert first_difference(built, run([a, b])[1], "C", cfg) is None
    for train, theirs in (([a], "folder"), ([b, a], "recordio+folder"),
                          ([a, b, c], "folder+recordio+folder")):
        cfg, other = run(train)
        assert first_difference(built, other, "C", cfg) == (
            f"teacher.cache C was built for other data: its format is folder+recordio, data.train "
            f"[{', '.join(train)}] has {theirs}")
    _, folders = run([a, c])
    cfg, swapped = run([c, a])
    assert first_difference(folders, swapped, "C", cfg).startswith(
        "teacher.cache C was built for other data: its digest is ")
