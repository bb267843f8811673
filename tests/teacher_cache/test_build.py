"""Building the teacher-embedding cache (``fr-distill cache-teacher``): the manifest, rows
equal to the teacher's output, the build through DALI, an interrupted build resumed, the
command line, a full disk, a cache inside the training folder or through a link."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_checkpoints_bitwise
from fr_distill.config import ConfigError, load_config
from fr_distill.data import preflight
from fr_distill.engine.trainer import train
from fr_distill.teacher_cache import CacheError
from fr_distill.commands.cache_teacher import cache_teacher_main
from fr_distill.engine.cache_teacher import build_cache
from fr_distill.teacher_cache.store import MANIFEST, ROWS_FILE, read_manifest, write_manifest
from .conftest import SHARD, check, copy_of, final, overrides, refusal, write_yaml


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
