"""Typed configuration: loading, overrides and every error path (issue: foundation)."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from fr_distill.config import (Config, ConfigError, check_paths, from_dict, load_config,
                               save_config, schema_reference, to_dict)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_the_paper_hyperparameters():
    cfg = load_config()
    assert (cfg.loss.iled.r, cfg.loss.iled.s, cfg.loss.iled.b) == (40.0, 0.9, 0.1)
    assert (cfg.loss.rpsd.r, cfg.loss.rpsd.t, cfg.loss.rpsd.b, cfg.loss.rpsd.weight) == (60.0, 0.05, 1.0, 40.0)
    assert (cfg.loss.sphereface2.lamb, cfg.loss.sphereface2.r, cfg.loss.sphereface2.m,
            cfg.loss.sphereface2.t, cfg.loss.sphereface2.lw) == (0.7, 40.0, 0.4, 3.0, 10.0)
    assert cfg.loss.bank.bank_factor == 3


def test_yaml_then_overrides_with_types(tmp_path):
    path = write(tmp_path, "a.yaml", "loss:\n  rpsd:\n    weight: 10\nschedule:\n  milestones: [1, 2]\n")
    cfg = load_config(path, ["loss.rpsd.weight=20", "model.name=mobilefacenet",
                             "eval.bin_sets=[a.bin, b.bin]", "data.skip_bad=true"])
    assert cfg.loss.rpsd.weight == 20.0 and isinstance(cfg.loss.rpsd.weight, float)
    assert cfg.model.name == "mobilefacenet"
    assert cfg.eval.bin_sets == ["a.bin", "b.bin"]
    assert cfg.data.skip_bad is True
    assert cfg.schedule.milestones == [1, 2]


def test_defaults_list_merges_bases_in_order(tmp_path):
    write(tmp_path, "base.yaml", "optim:\n  lr: 0.5\nloss:\n  iled:\n    s: 0.7\n")
    child = write(tmp_path, "child.yaml", "defaults: [base.yaml]\noptim:\n  lr: 0.2\n")
    cfg = load_config(child)
    assert cfg.optim.lr == 0.2 and cfg.loss.iled.s == 0.7


def test_unknown_key_names_it_and_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'loss\.rpsd\.wieght'; did you mean loss\.rpsd\.weight\?"):
        load_config(None, ["loss.rpsd.wieght=2"])


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "bad.yaml", "optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "optim.learning_rate" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=abc", "config key 'optim.lr' must be float, got 'abc'"),
    ("data.batch_size=2.5", "config key 'data.batch_size' must be int, got 2.5"),
    ("data.flip=yes please", "config key 'data.flip' must be bool, got 'yes please'"),
    ("schedule.milestones=5", "config key 'schedule.milestones' must be a list, got 5"),
    ("optim.lr=-1", "config key 'optim.lr' must be > 0, got -1.0"),
    ("loss.sphereface2.lamb=1.5", "config key 'loss.sphereface2.lamb' must be in (0, 1), got 1.5"),
    ("precision.amp=fp8", "config key 'precision.amp' must be one of bf16, fp16, fp32, got 'fp8'"),
    ("schedule.milestones=[3, 1]", "config key 'schedule.milestones' must be increasing, got [3, 1]"),
    ("schedule.warmup_steps=100000", "config key 'schedule.warmup_steps' must be < schedule.total_steps"),
])
def test_wrong_type_or_range_names_key_and_value(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_projector_required_when_dims_differ():
    with pytest.raises(ConfigError, match="model.projector=true"):
        load_config(None, ["teacher.path=t.pth", "teacher.embedding_dim=256"])
    cfg = load_config(None, ["teacher.path=t.pth", "teacher.embedding_dim=256", "model.projector=true"])
    assert cfg.model.projector


def test_bad_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "broken.yaml", "optim:\n  lr: [0.1\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: line \d+ invalid YAML"):
        load_config(path)


def test_missing_file_and_circular_defaults(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path, "a.yaml", "defaults: [b.yaml]\n")
    write(tmp_path, "b.yaml", "defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="circular 'defaults' include"):
        load_config(tmp_path / "a.yaml")


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(None, ["optim.lr"])


def test_check_paths_before_any_model_is_built(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    cfg = load_config(None, [f"data.train={data}", "teacher.path=" + str(tmp_path / "t.pth")])
    with pytest.raises(ConfigError, match=r"config key 'teacher.path': path not found: .*t\.pth"):
        check_paths(cfg)
    with pytest.raises(ConfigError, match="config key 'data.train' is empty"):
        check_paths(load_config(None, ["data.train="]))
    with pytest.raises(ConfigError, match="teacher.path' is empty but distillation terms loss.iled, loss.rpsd"):
        check_paths(load_config(None, [f"data.train={data}"]))
    (tmp_path / "t.pth").write_bytes(b"x")
    cfg = load_config(None, [f"data.train={data}", f"teacher.path={tmp_path / 't.pth'}",
                             f"eval.bin_sets=[{tmp_path / 'lfw.bin'}]"])
    with pytest.raises(ConfigError, match=r"eval.bin_sets\[0\]': path not found"):
        check_paths(cfg)


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["loss.rpsd.t=0.1", "eval.bin_sets=[x.bin]"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert from_dict(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())) == cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_schema_reference_lists_every_leaf_key():
    keys = {row[0] for row in schema_reference()}

    def leaves(cls, prefix=""):
        for f in dataclasses.fields(cls):
            sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(sub):
                yield from leaves(type(sub), prefix + f.name + ".")
            else:
                yield prefix + f.name

    assert keys == set(leaves(Config))
    assert ("loss.rpsd.student_anchor", "str", "student_bank", "one of student_bank, teacher_bank",
            "student similarities against the student bank or the teacher bank (E4)") in schema_reference()
    assert all(row[4] for row in schema_reference())
