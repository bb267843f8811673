"""``model.init``: a fresh run's student starts from a weights file, loaded strictly but for the
names ``model.init_skip`` leaves fresh, without changing the run's random stream.

Runs are tiny (IResNet-18 at width 1/8, 32-d, one or two steps on the synthetic set, one
process, plain SphereFace2 training); the student and the head are read at the start of the
loop through a callback."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from fr_distill.config import ConfigError, load_config
from fr_distill.checkpoint import files as checkpoint
from fr_distill.engine.trainer import train
from fr_distill.engine.callbacks import Callback
from fr_distill.commands.train import train_main
from fr_distill.engine.preflight import dry_run
from fr_distill.errors import FrDistillError
from fr_distill.models import get_backbone
from fr_distill.models.weights import read_init_weights

EMBEDDING_LAYERS = ["fc.weight", "fc.bias", "features.weight", "features.bias",
                    "features.running_mean", "features.running_var",
                    "features.num_batches_tracked"]


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.train={data / 'train'}", "data.loader=torch", "data.num_workers=0",
            "data.batch_size=8", "model.width=0.125", "model.embedding_dim=32",
            "precision.amp=fp32", "loss.iled.weight=0", "loss.rpsd.weight=0",
            f"run.output_dir={out}", "logging.tensorboard=false", "schedule.warmup_steps=0",
            "schedule.total_steps=1", "checkpoint.every_steps=1", *extra]


class StartState(Callback):
    """The student's and the objective's state when the loop starts (after init or resume)."""

    def on_train_start(self, run) -> None:
        self.student = {k: v.clone() for k, v in run.student.state_dict().items()}
        self.objective = {k: v.clone() for k, v in run.objective.state_dict().items()}


def start_state(data: Path, out: Path, *extra: str) -> StartState:
    state = StartState()
    train(load_config(None, overrides(data, out, *extra)), callbacks=[state])
    return state


def same(a: dict, b: dict, keys=None) -> bool:
    """Bitwise equality of two state dicts (on ``keys``, else on all of ``a``'s)."""
    return all(torch.equal(a[k], b[k]) for k in (a if keys is None else keys))


@pytest.fixture
def log_lines():
    """The messages of the ``fr_distill`` loggers (the console handler does not propagate)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Keep()
    logging.getLogger("fr_distill").addHandler(handler)
    yield lines
    logging.getLogger("fr_distill").removeHandler(handler)


def insightface_file(path: Path, state: dict, prefix: str = "") -> Path:
    torch.save({prefix + k: v for k, v in state.items()}, path)
    return path


# -- starting from weights ---------------------------------------------------------------------
def test_a_student_starts_from_another_runs_checkpoint(synthetic_data, tmp_path, log_lines,
                                                        single_thread):
    """The student of step 0 is bitwise the checkpoint's; the log says where it came from."""
    train(load_config(None, overrides(synthetic_data, tmp_path / "source")))
    source = tmp_path / "source" / "checkpoints" / "step_00000001.pt"
    state = start_state(synthetic_data, tmp_path / "run", f"model.init={source}")
    assert same(state.student, checkpoint.load(source)["student"])
    assert (f"student initialized from {source} (fr_distill checkpoint of step 1): "
            f"{len(state.student)} tensors loaded strictly; left at their fresh initialization "
            f"(model.init_skip): none") in log_lines


def test_a_student_starts_from_an_insightface_state_dict(synthetic_data, teacher_file, tmp_path,
                                                         single_thread):
    """A ``backbone.pth`` saved under DDP (``module.`` prefix) loads; so does an arcface_torch
    training checkpoint's ``state_dict_backbone``."""
    weights = torch.load(teacher_file, weights_only=True)
    wrapped = insightface_file(tmp_path / "backbone.pth", weights, prefix="module.")
    state = start_state(synthetic_data, tmp_path / "run", f"model.init={wrapped}")
    assert same(weights, state.student) and set(weights) == set(state.student)
    arcface = tmp_path / "checkpoint_gpu_0.pt"
    torch.save({"epoch": 3, "state_dict_backbone": weights}, arcface)
    read, kind = read_init_weights(str(arcface), load_config(None, overrides(
        synthetic_data, tmp_path)).model)
    assert kind == "state dict" and same(weights, read)


def test_model_init_leaves_the_random_stream_unchanged(synthetic_data, teacher_file, tmp_path,
                                                       single_thread):
    """The SphereFace2 head, built from the random stream after the student, starts bitwise as
    without model.init."""
    plain = start_state(synthetic_data, tmp_path / "plain")
    init = start_state(synthetic_data, tmp_path / "init", f"model.init={teacher_file}")
    assert plain.objective and same(plain.objective, init.objective)
    assert not same(plain.student, init.student)


def test_init_skip_leaves_the_matched_layers_fresh(synthetic_data, teacher_file, tmp_path,
                                                   log_lines, single_thread):
    """A 16-d student from the 32-d file: the embedding layers (skipped) are those of a run
    without model.init, every other tensor is the file's; the log names the skipped ones."""
    weights = torch.load(teacher_file, weights_only=True)
    plain = start_state(synthetic_data, tmp_path / "plain", "model.embedding_dim=16")
    init = start_state(synthetic_data, tmp_path / "init", "model.embedding_dim=16",
                       f"model.init={teacher_file}", "model.init_skip=[features.*, fc.*]")
    kept = [k for k in init.student if k not in EMBEDDING_LAYERS]
    assert set(init.student) - set(kept) == set(EMBEDDING_LAYERS)
    assert same(init.student, plain.student, EMBEDDING_LAYERS)
    assert same(init.student, weights, kept)
    assert same(plain.objective, init.objective)
    (line,) = [line for line in log_lines if line.startswith("student initialized from")]
    assert line.endswith(f"{len(kept)} tensors loaded strictly; left at their fresh "
                         f"initialization (model.init_skip): {', '.join(EMBEDDING_LAYERS)}")


# -- refusals ----------------------------------------------------------------------------------
def refused(data: Path, out: Path, *extra: str) -> FrDistillError:
    """The one-line error a run with ``extra`` stops with, before its first step."""
    with pytest.raises(FrDistillError) as err:
        train(load_config(None, overrides(data, out, *extra)))
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
    assert not list(out.glob("checkpoints/step_*.pt")) and not (out / "metrics.jsonl").exists()
    return err.value


def test_a_missing_file_is_a_config_error_naming_the_key(synthetic_data, tmp_path):
    err = refused(synthetic_data, tmp_path / "run", f"model.init={tmp_path / 'nope.pth'}")
    assert isinstance(err, ConfigError)
    assert str(err) == f"config key 'model.init': path not found: {tmp_path / 'nope.pth'}"
    err = refused(synthetic_data, tmp_path / "run", "model.init_skip=[fc.*]")
    assert str(err) == ("config key 'model.init' is empty but model.init_skip is set: name the "
                        "weights file the student starts from")


def test_another_architecture_is_refused_listing_the_keys(synthetic_data, tmp_path,
                                                          single_thread):
    """An IResNet-34 state dict: the unexpected keys with their count and what the file
    holds; a checkpoint of another backbone: both architectures."""
    path = insightface_file(tmp_path / "r34.pth",
                            get_backbone("iresnet34", 32, width=0.125).state_dict())
    err = refused(synthetic_data, tmp_path / "run", f"model.init={path}")
    assert str(err).startswith(f"model.init: {path} does not fit the student iresnet18 (width "
                               f"0.125, embedding_dim 32): unexpected keys [layer1.2.bn1.weight, ")
    assert "more)]" in str(err) and "missing keys" not in str(err)
    assert str(err).endswith("the file looks like iresnet34 (width 0.125, embedding_dim 32)")
    mobile = insightface_file(tmp_path / "mbf.pth", get_backbone("mobilefacenet", 32).state_dict())
    err = refused(synthetic_data, tmp_path / "run", f"model.init={mobile}")
    assert "missing keys [conv1.weight" in str(err) and "; unexpected keys [" in str(err)

    other = tmp_path / "other_run"
    train(load_config(None, overrides(synthetic_data, other, "model.name=iresnet34")))
    source = other / "checkpoints" / "step_00000001.pt"
    err = refused(synthetic_data, tmp_path / "run", f"model.init={source}")
    assert str(err) == (f"model.init: {source} is a checkpoint of iresnet34 (width 0.125, "
                        f"embedding_dim 32), the student is iresnet18 (width 0.125, "
                        f"embedding_dim 32): the backbone and width must be the same")


def test_a_shape_mismatch_is_refused_naming_both_shapes(synthetic_data, teacher_file, tmp_path,
                                                        single_thread):
    """A 16-d student from the 32-d file without init_skip: the embedding layers, file shape
    first; a skip pattern that matches nothing is refused as a likely typo."""
    err = refused(synthetic_data, tmp_path / "run", "model.embedding_dim=16",
                  f"model.init={teacher_file}")
    assert str(err).startswith(f"model.init: {teacher_file} does not fit the student iresnet18 "
                               f"(width 0.125, embedding_dim 16): shape mismatches (file vs "
                               f"model) [")
    features = torch.load(teacher_file, weights_only=True)["fc.weight"].shape[1]
    assert f"fc.weight (32, {features}) vs (16, {features})" in str(err)
    assert "features.weight (32,) vs (16,)" in str(err) and "(+1 more)" in str(err)
    err = refused(synthetic_data, tmp_path / "run", f"model.init={teacher_file}",
                  "model.init_skip=[fc.*, feature.*]")
    assert str(err) == (f"model.init_skip pattern(s) 'feature.*' match no name of the student "
                        f"iresnet18 (width 0.125, embedding_dim 32) or of {teacher_file}")


@pytest.mark.parametrize("content, message", [
    (b"hello", "not a torch.save file"),
    ([1, 2, 3], "holds no state dict of tensors (found list)"),
    ({"epoch": 3}, "holds no state dict of tensors (found ['epoch'])"),
], ids=["text", "list", "dict"])
def test_a_file_that_is_not_weights_is_refused(synthetic_data, tmp_path, capsys, content,
                                               message):
    """One line on stderr naming the key and the file, exit status 2, from the command line."""
    path = tmp_path / "weights.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    out = tmp_path / "run"
    refused(synthetic_data, out, f"model.init={path}")
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    assert train_main(["--config", str(config),
                       *overrides(synthetic_data, out, f"model.init={path}")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.init: ") and str(path) in err and message in err
    assert err.count("\n") == 1


# -- resume ------------------------------------------------------------------------------------
def test_a_resumed_run_ignores_model_init(synthetic_data, teacher_file, tmp_path, log_lines,
                                          single_thread):
    """The same command run again resumes: the student is the checkpoint's (not the file's),
    and the log and the dry run say model.init is ignored."""
    out = tmp_path / "run"
    first = start_state(synthetic_data, out, f"model.init={teacher_file}")
    assert same(first.student, torch.load(teacher_file, weights_only=True))
    again = load_config(None, overrides(synthetic_data, out, f"model.init={teacher_file}",
                                        "schedule.total_steps=2"))
    assert (f"student   iresnet18 width 0.125, 32-d; model.init {teacher_file} ignored (the "
            f"checkpoint's student resumes)") in dry_run(again).splitlines()
    state = StartState()
    result = train(again, callbacks=[state])
    assert (result.start_step, result.step) == (1, 2)
    assert same(state.student, checkpoint.load(out / "checkpoints" / "step_00000001.pt")["student"])
    assert not same(state.student, first.student)
    assert (f"model.init {teacher_file} ignored: a resumed run takes the student from its "
            f"checkpoint") in log_lines


def test_the_dry_run_names_the_init_file(synthetic_data, teacher_file, tmp_path):
    plan = dry_run(load_config(None, overrides(synthetic_data, tmp_path / "run",
                                               f"model.init={teacher_file}",
                                               "model.init_skip=[features.*, fc.*]")))
    assert (f"student   iresnet18 width 0.125, 32-d, initialized from {teacher_file}, leaving "
            f"features.*, fc.* at their fresh initialization") in plan.splitlines()


def test_a_resumed_run_needs_no_model_init_file(synthetic_data, teacher_file, tmp_path,
                                                single_thread):
    """A requeued job whose scratch copy of the model.init file was cleaned up: the run
    resumes from its checkpoint (and its dry run says so) instead of refusing the missing
    file it would not read; a fresh start still refuses it."""
    init = tmp_path / "backbone.pth"
    init.write_bytes(teacher_file.read_bytes())
    out = tmp_path / "run"
    train(load_config(None, overrides(synthetic_data, out, f"model.init={init}")))
    init.unlink()
    again = load_config(None, overrides(synthetic_data, out, f"model.init={init}",
                                        "schedule.total_steps=2"))
    assert (f"student   iresnet18 width 0.125, 32-d; model.init {init} ignored (the "
            f"checkpoint's student resumes)") in dry_run(again).splitlines()
    result = train(again)
    assert (result.status, result.start_step, result.step) == ("completed", 1, 2)
    err = refused(synthetic_data, tmp_path / "fresh", f"model.init={init}")
    assert str(err) == f"config key 'model.init': path not found: {init}"
