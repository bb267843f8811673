"""The teacher-embedding cache: exact rows, bitwise-equal training, and every refusal.

One process, the synthetic set (192 samples), the session's random IResNet-18 teacher (width
1/8, 32-d) and per-rank batch 8, on one thread like a torchrun worker. The 2-rank exactness
test is in ``test_train_distributed.py`` (it shares that file's 2-rank reference run).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_checkpoints_bitwise
from fr_distill.config import ConfigError, load_config
from fr_distill.data import preflight
from fr_distill.checkpoint import files as checkpoint
from fr_distill.engine.trainer import train
from fr_distill.engine.callbacks import Callback
from fr_distill.models import get_backbone
from fr_distill.teacher_cache import CacheError, check_cache
from fr_distill.commands.cache_teacher import cache_teacher_main
from fr_distill.engine.cache_teacher import build_cache
from fr_distill.paths import file_sha256
from fr_distill.teacher_cache.store import MANIFEST, ROWS_FILE, read_manifest, write_manifest

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


@pytest.fixture(scope="module")
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


def test_manifest_records_identity_shards_and_checksums(cache, synthetic_data, teacher_file):
    manifest = json.loads((cache / MANIFEST).read_text())
    assert manifest["complete"] and manifest["nonfinite_rows"] == 0
    assert sorted(manifest["shards"]) == ["0", "1", "2", "3"]
    assert manifest["flips"] == [False, True] and manifest["embedding_dim"] == 32
    identity = manifest["identity"]
    assert identity["data"]["num_samples"] == 192 and identity["data"]["format"] == "folder"
    assert identity["teacher"]["architecture"] == {"name": "iresnet18", "embedding_dim": 32,
                                                   "width": 0.125}
    assert identity["preprocessing"]["decoder"] == "torch" and identity["dtype"] == "float32"
    assert manifest["execution"]["batch_size"] == 8 and manifest["execution"]["amp"] == "fp32"
    assert (cache / ROWS_FILE).stat().st_size == 192 * 2 * 32 * 4


def test_rows_are_the_teachers_output_and_float16_is_their_rounding(
        cache, synthetic_data, teacher_file, tmp_path, single_thread):
    """Row [i, f] is the teacher's embedding of sample i (flipped when f = 1) computed in a
    batch of 8 like a training step; a float16 build stores the same rows rounded."""
    from fr_distill.data.decode import decode_rgb
    from fr_distill.data.dataset import SampleBytes
    from fr_distill.data.torch_loader import normalize
    from fr_distill.models import load_frozen_model

    rows = np.fromfile(cache / ROWS_FILE, dtype=np.float32).reshape(192, 2, 32)
    info = preflight(load_config(None, overrides(synthetic_data, teacher_file)).data)
    images = SampleBytes(info)
    picked = [3, 77, 150, 191, 0, 9, 64, 120]
    pixels = np.stack([decode_rgb(images[i], images.name(i)) for i in picked])
    teacher = load_frozen_model(str(teacher_file), "iresnet18", 32, 0.125)
    for flip in (0, 1):
        batch = torch.from_numpy(np.ascontiguousarray(pixels[:, :, ::-1] if flip else pixels))
        expected = teacher(normalize(batch, torch.device("cpu"))).numpy()
        assert np.array_equal(rows[picked, flip], expected)
    half = tmp_path / "fp16"
    build_cache(load_config(None, overrides(synthetic_data, teacher_file, f"teacher.cache={half}",
                                            "teacher.cache_dtype=float16")), shard_samples=SHARD)
    assert np.array_equal(np.fromfile(half / ROWS_FILE, dtype=np.float16).reshape(192, 2, 32),
                          rows.astype(np.float16))


def test_training_from_the_cache_is_bitwise_the_teacher_on_the_fly_and_resumes_exactly(
        cache, synthetic_data, teacher_file, tmp_path, single_thread):
    """Unified objective, 30 steps over an epoch boundary: the cached run's checkpoints equal
    the on-the-fly run's at every save; a cached run resumed at step 10 (mid-epoch) ends
    bitwise equal too."""
    fly = train(load_config(None, overrides(synthetic_data, teacher_file,
                                            f"run.output_dir={tmp_path / 'fly'}")))
    cached = train(load_config(None, overrides(synthetic_data, teacher_file,
                                               f"run.output_dir={tmp_path / 'cached'}",
                                               f"teacher.cache={cache}")))
    assert cached.teacher is None and fly.teacher is not None
    for step in (10, 20, 30):
        assert_checkpoints_bitwise(final(tmp_path / "fly", step), final(tmp_path / "cached", step))
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "cached", resumed_dir)
    for step in (20, 30):
        (resumed_dir / "checkpoints" / f"step_{step:08d}.pt").unlink()
    resumed = train(load_config(None, overrides(synthetic_data, teacher_file,
                                                f"run.output_dir={resumed_dir}",
                                                f"teacher.cache={cache}")))
    assert (resumed.start_step, resumed.step) == (10, STEPS)
    assert_checkpoints_bitwise(final(tmp_path / "fly"), final(resumed_dir))


def test_the_dali_loader_builds_and_reads_the_cache_exactly(synthetic_data, teacher_file,
                                                            tmp_path, single_thread):
    """The build's sweep through DALI's parallel external source (CPU decoding): a run
    reading that cache equals the DALI run with the teacher on the fly."""
    dali = ("data.loader=dali", "data.num_workers=1", "schedule.total_steps=6",
            "checkpoint.every_steps=6")
    cache = tmp_path / "cache"
    manifest = build_cache(load_config(None, overrides(synthetic_data, teacher_file, *dali,
                                                       f"teacher.cache={cache}")),
                           shard_samples=SHARD)
    assert manifest["identity"]["preprocessing"]["decoder"] == "dali-cpu"
    for name, extra in (("fly", ()), ("cached", (f"teacher.cache={cache}",))):
        train(load_config(None, overrides(synthetic_data, teacher_file, *dali, *extra,
                                          f"run.output_dir={tmp_path / name}")))
    assert_checkpoints_bitwise(final(tmp_path / "fly", 6), final(tmp_path / "cached", 6))


# -- refusals --------------------------------------------------------------------------------
def check(data: Path, teacher: Path, directory: Path, *extra: str) -> dict:
    cfg = load_config(None, overrides(data, teacher, f"teacher.cache={directory}", *extra))
    return check_cache(cfg, preflight(cfg.data), torch.device("cpu"), cfg.data.batch_size)


def refusal(data: Path, teacher: Path, directory: Path, *extra: str) -> str:
    with pytest.raises(CacheError) as err:
        check(data, teacher, directory, *extra)
    assert err.value.exit_code == 2
    return str(err.value)


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


def test_refuses_missing_incomplete_truncated_or_corrupt_files(cache, synthetic_data,
                                                               teacher_file, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert refusal(synthetic_data, teacher_file, empty) == (
        f"teacher.cache {empty}: no {MANIFEST}; build the cache with fr-distill cache-teacher "
        f"--config <this config>")
    copies = {}
    for name in ("incomplete", "truncated", "corrupt"):
        copies[name] = tmp_path / name
        shutil.copytree(cache, copies[name])
    manifest = read_manifest(copies["incomplete"])
    del manifest["shards"]["3"]
    manifest["complete"] = False
    write_manifest(copies["incomplete"], manifest)
    assert refusal(synthetic_data, teacher_file, copies["incomplete"]) == (
        f"teacher.cache {copies['incomplete']} is incomplete: 3 of 4 shards written; run "
        f"fr-distill cache-teacher again to finish it")
    rows = copies["truncated"] / ROWS_FILE
    rows.write_bytes(rows.read_bytes()[:-100])
    assert refusal(synthetic_data, teacher_file, copies["truncated"]) == (
        f"{rows}: {192 * 2 * 32 * 4 - 100} bytes, the manifest needs {192 * 2 * 32 * 4}; the "
        f"file is truncated or from another build: build the cache again")
    rows = copies["corrupt"] / ROWS_FILE
    data = bytearray(rows.read_bytes())
    data[120 * 2 * 32 * 4 + 17] ^= 0x40  # a byte of sample 120: shard 2 (samples 100-149)
    rows.write_bytes(bytes(data))
    assert refusal(synthetic_data, teacher_file, copies["corrupt"]) == (
        f"{rows}: shard 2 (samples 100-149) does not match its sha256 in {MANIFEST}: the file "
        f"is corrupt; build the cache again")


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


# -- building ----------------------------------------------------------------------------------
def test_an_interrupted_build_resumes_and_a_changed_one_is_refused(
        cache, synthetic_data, teacher_file, tmp_path, caplog, single_thread):
    """A build whose last two shards were never recorded (one of them half written) and whose
    recorded shard 1 was damaged computes exactly those three again and ends with the same
    bytes; a build started with another batch size or teacher is refused unless --force."""
    directory = tmp_path / "cache"
    shutil.copytree(cache, directory)
    manifest = read_manifest(directory)
    for shard in ("2", "3"):
        del manifest["shards"][shard]
    manifest["complete"] = False
    write_manifest(directory, manifest)
    rows = np.memmap(directory / ROWS_FILE, dtype=np.float32, mode="r+", shape=(192, 2, 32))
    rows[60, 1, 5] += 1.0  # shard 1 no longer matches its sha256
    rows[100:125] = 0  # shard 2 half written
    rows.flush()
    base = overrides(synthetic_data, teacher_file, f"teacher.cache={directory}")
    with caplog.at_level(logging.INFO, logger="fr_distill"):
        build_cache(load_config(None, base), shard_samples=SHARD)
    assert "1 recorded shards do not match their sha256 and are computed again" in caplog.text
    assert "resuming, 3 of 4 shards to compute" in caplog.text
    assert (directory / ROWS_FILE).read_bytes() == (cache / ROWS_FILE).read_bytes()
    assert read_manifest(directory)["shards"] == read_manifest(cache)["shards"]
    assert read_manifest(directory)["complete"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fr_distill"):
        build_cache(load_config(None, base), shard_samples=SHARD)
    assert "is complete and verified: nothing to do" in caplog.text
    with pytest.raises(CacheError) as err:
        build_cache(load_config(None, base + ["data.batch_size=4"]), shard_samples=SHARD)
    assert str(err.value) == (f"teacher.cache {directory} was being built with other settings "
                              f"(batch_size 8 → 4); finish it with the same settings, or pass "
                              f"--force to build it again from scratch")
    with pytest.raises(CacheError, match="the config has teacher.input_mean=0.0, teacher.input_std"
                                         "=None; finish it with the same settings, or pass --force"):
        build_cache(load_config(None, base + ["teacher.input_mean=0"]), shard_samples=SHARD)
    status = cache_teacher_main(["--config", str(write_yaml(tmp_path)), *base,
                                 "data.batch_size=4", "--force", "--shard-samples", "100"])
    assert status == 0
    forced = read_manifest(directory)
    assert forced["execution"]["batch_size"] == 4 and sorted(forced["shards"]) == ["0", "1"]


def write_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    return path


def test_command_line_errors(synthetic_data, teacher_file, tmp_path, capsys):
    config = write_yaml(tmp_path)
    base = overrides(synthetic_data, teacher_file)
    assert cache_teacher_main(["--config", str(config), *base]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: config key 'teacher.cache' is empty: name the directory the cache is written to "
        "(training reads it with the same key)")
    assert cache_teacher_main(["--config", str(config), *base, f"teacher.cache={tmp_path / 'c'}",
                               "--shard-samples", "0"]) == 2
    assert "--shard-samples must be >= 1, got 0" in capsys.readouterr().err


def test_a_second_build_on_the_same_directory_is_refused(synthetic_data, teacher_file, tmp_path):
    """A build holds the directory's lock; another one stops at once, writing nothing."""
    import fcntl

    directory = tmp_path / "cache"
    directory.mkdir()
    with open(directory / ".lock", "w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 1 on node7 since 2026-11-30T08:00:00")
        held.flush()
        with pytest.raises(CacheError) as err:
            build_cache(load_config(None, overrides(synthetic_data, teacher_file,
                                                    f"teacher.cache={directory}")))
    assert str(err.value) == (f"teacher.cache {directory} is in use by another cache build (pid "
                              f"1 on node7 since 2026-11-30T08:00:00); wait for it, stop it, or "
                              f"choose another teacher.cache")
    assert sorted(p.name for p in directory.iterdir()) == [".lock"]


def test_dry_run_checks_the_cache(cache, synthetic_data, teacher_file, tmp_path):
    from fr_distill.engine.preflight import dry_run

    base = overrides(synthetic_data, teacher_file, f"run.output_dir={tmp_path / 'run'}",
                     f"teacher.cache={cache}")
    assert f"rows read from the cache {cache} (float32, placement auto)" in dry_run(
        load_config(None, base))
    with pytest.raises(CacheError, match="holds float32 rows, the config has "
                                         "teacher.cache_dtype=float16"):
        dry_run(load_config(None, base + ["teacher.cache_dtype=float16"]))


# -- faults and hostile input ------------------------------------------------------------------
def copy_of(cache: Path, directory: Path) -> Path:
    shutil.copytree(cache, directory, ignore=shutil.ignore_patterns(".lock"))
    return directory


def test_a_full_disk_is_one_line_and_leaves_no_cache_taken_for_valid(
        cache, synthetic_data, teacher_file, tmp_path, monkeypatch, capsys, single_thread):
    """No room for the rows file: one line naming it, exit 1, before any row is computed (the
    file was sparse and written through a memory map: a SIGBUS killed the build). A write
    failing in shard 2 (a full copy-on-write file system): one line, the shards before it kept,
    the cache refused as incomplete, and the same command then finishes it exactly."""
    import errno
    import os

    from fr_distill.teacher_cache.store import CacheWriteError

    directory = tmp_path / "cache"
    base = overrides(synthetic_data, teacher_file, f"teacher.cache={directory}")

    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    argv = ["--config", str(write_yaml(tmp_path)), *base, "--shard-samples", str(SHARD)]
    assert cache_teacher_main(argv) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {directory / ROWS_FILE}: cannot allocate {192 * 2 * 32 * 4} bytes (No space "
        f"left on device); no row was computed: free space or choose another teacher.cache")
    assert (directory / ROWS_FILE).stat().st_size == 0
    assert refusal(synthetic_data, teacher_file, directory).endswith("is incomplete: 0 of 4 "
                                                                     "shards written; run "
                                                                     "fr-distill cache-teacher "
                                                                     "again to finish it")
    monkeypatch.undo()
    real_pwrite, shard_2 = os.pwrite, 100 * 2 * 32 * 4

    def full_from_shard_2(fd, data, offset):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(ROWS_FILE) and offset >= shard_2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_from_shard_2)
    with pytest.raises(CacheWriteError) as err:
        build_cache(load_config(None, base), shard_samples=SHARD)
    assert str(err.value) == (f"{directory / ROWS_FILE}: cannot be written (No space left on "
                              f"device); the shards already recorded are kept: free space and "
                              f"run the same command to finish the build")
    assert err.value.exit_code == 1
    assert sorted(read_manifest(directory)["shards"]) == ["0", "1"]
    assert "is incomplete: 2 of 4 shards written" in refusal(synthetic_data, teacher_file,
                                                             directory)
    monkeypatch.undo()
    build_cache(load_config(None, base), shard_samples=SHARD)
    assert (directory / ROWS_FILE).read_bytes() == (cache / ROWS_FILE).read_bytes()
    assert check(synthetic_data, teacher_file, directory)["complete"]


class ForceDuringTheRun(Callback):
    """At step 1, ``cache-teacher --force`` on the cache the run is reading."""

    def __init__(self, argv: list[str], capsys) -> None:
        self.argv, self.capsys, self.outcome = argv, capsys, None

    def on_step_end(self, run, stats) -> None:
        if run.step == 1:
            self.capsys.readouterr()
            self.outcome = cache_teacher_main(self.argv), self.capsys.readouterr().err.strip()


def test_a_cache_a_run_reads_is_not_rebuilt_under_it_nor_read_while_built(
        cache, synthetic_data, teacher_file, tmp_path, capsys, single_thread):
    """A run holds a shared lock on its cache: ``--force`` stops with one line (it truncated
    the rows the run was reading: zero rows, silently), the run ends normally and releases
    it. A build in progress (exclusive lock, its holder line) makes a run refuse the cache."""
    import fcntl
    import os

    from fr_distill.teacher_cache.lock import LOCK_FILE, lock_cache, release_cache

    directory = copy_of(cache, tmp_path / "cache")
    base = overrides(synthetic_data, teacher_file, f"teacher.cache={directory}",
                     "schedule.total_steps=2", "checkpoint.every_steps=2")
    force = ForceDuringTheRun(["--config", str(write_yaml(tmp_path)), *base, "--force",
                               "--shard-samples", str(SHARD)], capsys)
    result = train(load_config(None, base + [f"run.output_dir={tmp_path / 'run'}"]), [force])
    assert result.status == "completed"
    assert force.outcome == (2, f"error: teacher.cache {directory} is in use: a training run is "
                                f"reading it; a build would change the rows under that run: "
                                f"wait for the run to end or stop it, or choose another "
                                f"teacher.cache")
    assert (directory / ROWS_FILE).read_bytes() == (cache / ROWS_FILE).read_bytes()
    fd = os.open(directory / LOCK_FILE, os.O_RDWR)  # released with the run
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)
    lock_cache(directory, fcntl.LOCK_EX)  # as a build holds it
    try:
        with pytest.raises(CacheError) as err:
            train(load_config(None, base + [f"run.output_dir={tmp_path / 'second'}"]))
    finally:
        release_cache(directory, fcntl.LOCK_EX)
    assert str(err.value).startswith(f"teacher.cache {directory} is being written by a cache "
                                     f"build (pid {os.getpid()} on ")
    assert str(err.value).endswith("); wait for it to finish, or stop it")
    assert not list((tmp_path / "second").glob("checkpoints/*.pt"))


def test_a_forked_worker_does_not_keep_the_cache_lock(tmp_path):
    """A child forked while a run holds its cache's lock (a DataLoader or DALI worker) does not
    share it: once the run releases it (or dies), a build can take it though the child lives."""
    import fcntl
    import os

    from fr_distill.teacher_cache.lock import LOCK_FILE, lock_cache, release_cache

    lock_cache(tmp_path, fcntl.LOCK_SH)
    started, done = os.pipe(), os.pipe()  # (read end, write end) each
    child = os.fork()
    if child == 0:  # the worker (its fork hooks have run): lives until the parent is done
        os.write(started[1], b"x")
        os.read(done[0], 1)
        os._exit(0)
    try:
        assert os.read(started[0], 1) == b"x"
        release_cache(tmp_path, fcntl.LOCK_SH)
        fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    finally:
        os.write(done[1], b"x")
        os.waitpid(child, 0)


def test_verify_content_refuses_a_cache_built_from_other_images_under_the_same_names(
        cache, synthetic_data, teacher_file, tmp_path, single_thread):
    """The default identity covers file names and labels, not the images' bytes: an image
    replaced by another under its name passes. With teacher.cache_verify_content the build
    records each image's sha256 (a new build, or one finished without them) and a run refuses,
    naming the first image that differs; a cache without digests is refused by such a run."""
    from fr_distill.teacher_cache.content import DIGESTS_FILE

    data = tmp_path / "data"
    shutil.copytree(synthetic_data / "train", data / "train")
    verify = "teacher.cache_verify_content=true"
    assert refusal(data, teacher_file, cache, verify) == (
        f"teacher.cache {cache} holds no image digests (built with "
        f"teacher.cache_verify_content=false) but this run has teacher.cache_verify_content=true:"
        f" build the cache with it, or set it false")
    fresh = tmp_path / "fresh"
    build_cache(load_config(None, overrides(data, teacher_file, f"teacher.cache={fresh}", verify)),
                shard_samples=SHARD)
    assert (fresh / ROWS_FILE).read_bytes() == (cache / ROWS_FILE).read_bytes()
    assert (fresh / DIGESTS_FILE).stat().st_size == 192 * 32
    finished = copy_of(cache, tmp_path / "finished")  # complete, no digests: recorded now
    build_cache(load_config(None, overrides(data, teacher_file, f"teacher.cache={finished}",
                                            verify)), shard_samples=SHARD)
    assert (finished / DIGESTS_FILE).read_bytes() == (fresh / DIGESTS_FILE).read_bytes()
    assert check(data, teacher_file, fresh, verify)["image_digests"]
    first, second = sorted((data / "train").glob("*/*.jpg"))[5:7]
    first.write_bytes(second.read_bytes())
    assert check(data, teacher_file, fresh)["complete"]  # the default identity: names only
    assert refusal(data, teacher_file, fresh, verify) == (
        f"teacher.cache {fresh} was built from other images: {first} is not the image the cache "
        f"was built from (its sha256 differs; 1 of 192 images differ); build the cache again "
        f"from these images")
    with pytest.raises(CacheError, match=f"{first} is not the image the cache was built from .*"
                                         f"; pass --force to build it again from these images"):
        build_cache(load_config(None, overrides(data, teacher_file, f"teacher.cache={fresh}",
                                                verify)), shard_samples=SHARD)


def test_a_damaged_manifest_is_one_line_naming_the_key(cache, synthetic_data, teacher_file,
                                                       tmp_path, capsys):
    """A manifest lacking a key or holding a value its readers cannot use (shard_samples 0
    divided a range by zero) is refused naming the manifest and the key, by a run and by a
    build."""
    directory = copy_of(cache, tmp_path / "cache")
    path, good = directory / MANIFEST, read_manifest(cache)
    damage = {"shard_samples": ("shard_samples", 0), "identity.data.num_samples": ("missing",),
              "flips": ("flips", [True]), "shards.7": ("shards", {**good["shards"], "7": "0"})}
    for key, change in damage.items():
        manifest = json.loads(json.dumps(good))
        if change == ("missing",):
            del manifest["identity"]["data"]["num_samples"]
        else:
            manifest[change[0]] = change[1]
        path.write_text(json.dumps(manifest))
        message = refusal(synthetic_data, teacher_file, directory)
        assert message.startswith(f"{path}: key '{key}' ")
        assert message.endswith("the manifest is damaged: build the cache again")
    assert refusal(synthetic_data, teacher_file, directory) == (
        f"{path}: key 'shards.7' must name one of the 4 shards and hold its sha256; the manifest "
        f"is damaged: build the cache again")
    manifest = json.loads(json.dumps(good))
    manifest["shard_samples"] = 0
    path.write_text(json.dumps(manifest))
    assert refusal(synthetic_data, teacher_file, directory) == (
        f"{path}: key 'shard_samples' must be an integer >= 1, not 0; the manifest is damaged: "
        f"build the cache again")
    base = overrides(synthetic_data, teacher_file, f"teacher.cache={directory}")
    assert cache_teacher_main(["--config", str(write_yaml(tmp_path)), *base]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {path}: key 'shard_samples' "
                                                            f"must be an integer >= 1, not 0; the "
                                                            f"manifest is damaged: build the "
                                                            f"cache again"]


def test_a_cache_inside_the_training_folder_or_through_a_link_is_refused(
        cache, synthetic_data, teacher_file, tmp_path, capsys):
    """teacher.cache inside data.train's image folder: refused at the build (it would turn
    into an identity of non-images for every later scan) and at a run. ``--force`` on a
    cache whose rows file is a link into another cache: refused, the other cache untouched."""
    data = tmp_path / "data"
    shutil.copytree(synthetic_data / "train", data / "train")
    inside = data / "train" / "teacher_cache"
    message = (f"config key 'teacher.cache': {inside} is inside the training image folder "
               f"{data / 'train'} (data.train), where its files would be read as images: "
               f"choose a directory outside it")
    with pytest.raises(ConfigError) as err:
        build_cache(load_config(None, overrides(data, teacher_file, f"teacher.cache={inside}")))
    assert str(err.value) == message and not inside.exists()
    copy_of(cache, inside)
    with pytest.raises(ConfigError) as err:
        train(load_config(None, overrides(data, teacher_file, f"teacher.cache={inside}",
                                          f"run.output_dir={tmp_path / 'run'}")))
    assert str(err.value) == message
    other, linked = copy_of(cache, tmp_path / "other"), copy_of(cache, tmp_path / "linked")
    (linked / ROWS_FILE).unlink()
    (linked / ROWS_FILE).symlink_to(other / ROWS_FILE)
    (other / ROWS_FILE).write_bytes(b"\0" * 100)  # the other cache's rows, as they were
    manifest = (linked / MANIFEST).read_bytes()
    base = overrides(synthetic_data, teacher_file, f"teacher.cache={linked}")
    assert cache_teacher_main(["--config", str(write_yaml(tmp_path)), *base, "--force"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {linked / ROWS_FILE} is a symbolic link (to {other / ROWS_FILE}); a cache build "
        f"does not write through links: remove it, or choose another teacher.cache")
    assert (other / ROWS_FILE).read_bytes() == b"\0" * 100
    assert (linked / MANIFEST).read_bytes() == manifest
