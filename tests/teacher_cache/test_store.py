"""The cache on disk and the rows training reads from it: training from the cache is bitwise
the teacher on the fly (the 2-rank case is in ``tests/scenarios/test_train_distributed.py``);
missing, incomplete, truncated or corrupt files and a damaged manifest are refused in one line."""
from __future__ import annotations

import json
import shutil

from conftest import assert_checkpoints_bitwise
from fr_distill.config import load_config
from fr_distill.engine.trainer import train
from fr_distill.commands.cache_teacher import cache_teacher_main
from fr_distill.teacher_cache.store import MANIFEST, ROWS_FILE, read_manifest, write_manifest
from .conftest import STEPS, copy_of, final, overrides, refusal, write_yaml


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
