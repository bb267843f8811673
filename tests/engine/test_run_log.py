"""Weights & Biases logging (``logging.wandb``), offline and without a network: the wandb run
gets the scalars of ``metrics.jsonl`` and TensorBoard with the resolved config, a resumed run
continues the same wandb run, a missing package stops the run (and its dry run) before any
model is built, and with the key off wandb is never imported.

wandb is part of the ``all`` extra that ``make install`` and CI install: the tests that need
it fail, not skip, where it is missing. Runs are tiny (IResNet-18 at width 1/8, 3 steps on the
synthetic set, one process)."""
from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from fr_distill.config import load_config, to_dict
from fr_distill.engine import build
from fr_distill.engine.trainer import train
from fr_distill.commands.train import train_main
from fr_distill.engine.run_dir import EARLIER_RUNS, WANDB_RUN_ID
from fr_distill.engine.run_log import LoggingSetupError


def overrides(data: Path, teacher: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.train={data / 'train'}", "data.loader=torch", "data.num_workers=0",
            "data.batch_size=8", "model.width=0.125", "model.embedding_dim=32",
            f"teacher.path={teacher}", "teacher.name=iresnet18", "teacher.width=0.125",
            "teacher.embedding_dim=32", "precision.amp=fp32", f"run.output_dir={out}",
            "logging.every_steps=1", "logging.tensorboard=false", "schedule.warmup_steps=0",
            "schedule.total_steps=3", "logging.wandb=true", "logging.wandb_mode=offline", *extra]


@pytest.fixture
def wandb_calls(tmp_path, monkeypatch):
    """wandb quiet, without system-metrics sampling or console capture, its own files under
    ``tmp_path``; returns the ``(run, data, step)`` of every ``Run.log`` call, each still
    passed on to the run. The wandb session ends after the test, so the next one reads its
    environment afresh."""
    try:
        import wandb
    except ImportError:
        pytest.fail("wandb is not installed: make install (pip install -e '.[all]') brings it",
                    pytrace=False)
    from wandb.sdk.wandb_run import Run

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_X_DISABLE_STATS", "true")
    calls = []
    log = Run.log

    def recording_log(self, data, step=None, commit=None):
        calls.append((self, dict(data), step))
        return log(self, data, step=step, commit=commit)

    monkeypatch.setattr(Run, "log", recording_log)
    yield calls
    wandb.teardown()


def by_step(pairs) -> dict[int, dict[str, float]]:
    """``{step: {tag: value}}`` from ``(step, {tag: value})`` pairs."""
    merged = defaultdict(dict)
    for step, scalars in pairs:
        merged[step].update(scalars)
    return dict(merged)


def jsonl_scalars(run_dir: Path) -> dict[int, dict[str, float]]:
    """``metrics.jsonl`` under the tags of the scalar sinks."""
    pairs = []
    for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        step = record.pop("step")
        if "eval" in record:
            pairs.append((step, {f"eval/{k}": v for k, v in record["eval"].items()}))
        else:
            pairs.append((step, {f"{'diagnostics' if '/' in k else 'train'}/{k}": v
                                 for k, v in record.items()}))
    return by_step(pairs)


def same(a: float, b: float, rel: float = 0.0) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=rel)


def test_the_wandb_run_gets_the_scalars_of_metrics_jsonl_and_tensorboard_with_the_config(
        synthetic_data, teacher_file, tmp_path, wandb_calls, single_thread):
    """Every training, diagnostics and evaluation scalar, at its step, under the TensorBoard
    tags; the resolved config; the offline run's files in the run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = load_config(None, overrides(synthetic_data, teacher_file, out, "logging.tensorboard=true",
                                      f"eval.bin_sets=[{synthetic_data / 'synth_lfw.bin'}]",
                                      "eval.every_steps=2"))
    train(cfg)

    logged = by_step((step, data) for _, data, step in wandb_calls)
    expected = jsonl_scalars(out)
    assert sorted(logged) == sorted(expected) == [1, 2, 3]
    for step in expected:
        assert logged[step].keys() == expected[step].keys(), step
        assert all(same(logged[step][k], v) for k, v in expected[step].items()), step
    assert {k for k in logged[2] if k.startswith("eval/")} == {k for k in logged[3]
                                                              if k.startswith("eval/")}
    assert {"eval/synth_lfw/accuracy_mean", "train/total", "train/iled", "train/rpsd",
            "train/lr", "diagnostics/grad_share/iled"} <= logged[2].keys()
    assert "eval/synth_lfw/accuracy_mean" not in logged[1]

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    board = by_step((e.step, {tag: e.value}) for tag in events.Tags()["scalars"]
                    for e in events.Scalars(tag))
    assert board.keys() == logged.keys()
    for step in board:  # TensorBoard keeps float32
        assert board[step].keys() == logged[step].keys(), step
        assert all(same(v, logged[step][k], 1e-6) for k, v in board[step].items()), step

    (wandb_run,) = {id(run): run for run, _, _ in wandb_calls}.values()
    assert wandb_run.id == (out / WANDB_RUN_ID).read_text().strip()
    assert wandb_run.settings.mode == "offline" and wandb_run.project == "fr_distill"
    assert dict(wandb_run.config) == to_dict(cfg)
    (offline,) = (out / "wandb").glob(f"offline-run-*-{wandb_run.id}/run-{wandb_run.id}.wandb")
    assert offline.stat().st_size > 0


def test_a_resumed_run_continues_its_wandb_run_and_a_fresh_start_begins_another(
        synthetic_data, teacher_file, tmp_path, wandb_calls, monkeypatch, single_thread):
    """2 steps, then the same directory to 3 steps: one wandb run id, steps 1-2 then 3. A
    fresh start (checkpoint.resume=false) gets a new id; the earlier run's id file and wandb
    files move to earlier_runs/ with its checkpoints. WANDB_MODE=offline wins over
    logging.wandb_mode=online (online would need an API key and a network)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    extra = ("logging.wandb_mode=online", "checkpoint.every_steps=1")
    train(load_config(None, overrides(synthetic_data, teacher_file, out, *extra,
                                      "schedule.total_steps=2")))
    first = (out / WANDB_RUN_ID).read_text().strip()
    result = train(load_config(None, overrides(synthetic_data, teacher_file, out, *extra)))
    assert (result.start_step, result.step) == (2, 3)
    assert (out / WANDB_RUN_ID).read_text().strip() == first
    assert [(run.id, run.settings.mode, step) for run, _, step in wandb_calls] == [
        (first, "offline", 1), (first, "offline", 2), (first, "offline", 3)]

    del wandb_calls[:]
    train(load_config(None, overrides(synthetic_data, teacher_file, out, *extra,
                                      "checkpoint.resume=false")))
    fresh = (out / WANDB_RUN_ID).read_text().strip()
    assert fresh != first and {run.id for run, _, _ in wandb_calls} == {fresh}
    (aside,) = (out / EARLIER_RUNS).iterdir()
    assert (aside / WANDB_RUN_ID).read_text().strip() == first
    assert list((aside / "wandb").glob(f"offline-run-*-{first}"))
    assert not list((out / "wandb").glob(f"offline-run-*-{first}"))


def test_without_the_wandb_package_the_run_and_its_dry_run_stop_before_any_model(
        synthetic_data, teacher_file, tmp_path, monkeypatch, capsys):
    """One line naming logging.wandb and the extra, exit status 2, from the command line and
    its --dry-run; no model built, nothing written."""
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr(build, "build_student", no_model)
    monkeypatch.setattr(build, "load_frozen_model", no_model)
    out = tmp_path / "run"
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    args = ["--config", str(config), *overrides(synthetic_data, teacher_file, out)]
    assert train_main(args) == 2
    message = capsys.readouterr().err.strip()
    assert message == ("error: logging.wandb is true but the wandb package is not installed "
                       "(pip install fr_distill[wandb], or set logging.wandb=false)")
    assert not out.exists()
    assert train_main([*args, "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == message


def test_online_without_an_api_key_is_one_line_before_the_first_step(
        synthetic_data, teacher_file, tmp_path, wandb_calls, monkeypatch, single_thread):
    """logging.wandb_mode=online where no wandb login was done: one line naming the keys,
    exit status 2, no step taken."""
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc holding a key
    monkeypatch.delenv("NETRC", raising=False)
    out = tmp_path / "run"
    with pytest.raises(LoggingSetupError) as err:
        train(load_config(None, overrides(synthetic_data, teacher_file, out,
                                          "logging.wandb_mode=online")))
    message = str(err.value)
    assert "\n" not in message and err.value.exit_code == 2
    assert message.startswith("logging.wandb: cannot start the wandb run ")
    assert message.endswith("run wandb login, or set logging.wandb_mode=offline")
    assert not (out / "metrics.jsonl").exists() and wandb_calls == []


def test_with_logging_wandb_off_wandb_is_never_imported(synthetic_data, teacher_file, tmp_path,
                                                        monkeypatch, single_thread):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any import of it raises
    out = tmp_path / "run"
    result = train(load_config(None, overrides(synthetic_data, teacher_file, out,
                                               "logging.wandb=false", "schedule.total_steps=2")))
    assert result.status == "completed" and result.step == 2
    assert not (out / "wandb").exists() and not (out / WANDB_RUN_ID).exists()
