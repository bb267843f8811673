"""Who may use a cache directory: a second build is refused, a cache a run reads is neither
rebuilt under it nor read while built, a forked worker does not keep the lock."""
from __future__ import annotations

import pytest

from fr_distill.config import load_config
from fr_distill.engine.trainer import train
from fr_distill.engine.callbacks import Callback
from fr_distill.teacher_cache import CacheError
from fr_distill.commands.cache_teacher import cache_teacher_main
from fr_distill.engine.cache_teacher import build_cache
from fr_distill.teacher_cache.store import ROWS_FILE
from .conftest import SHARD, copy_of, overrides, write_yaml


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
