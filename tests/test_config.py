"""Typed configuration: loading, overrides and every error path; a list of training sets in
``data.train``, the balance and anchor settings, and the shipped sweep and teacher-gap configs."""
from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from fr_distill.config import (Config, ConfigError, check_paths, from_dict, load_config, rules,
                               save_config, schema_reference, to_dict, validate)


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
    ("precision.amp=fp8", "config key 'precision.amp' must be one of bf16, fp16, fp32, off, got 'fp8'"),
    ("schedule.milestones=[3, 1]", "config key 'schedule.milestones' must be increasing, got [3, 1]"),
    ("schedule.warmup_steps=100000", "config key 'schedule.warmup_steps' must be < schedule.total_steps"),
    ("checkpoint.async_save=true", "config key 'checkpoint.async_save' needs checkpoint.format=dcp, "
                                   "got checkpoint.format='file'"),
])
def test_wrong_type_or_range_names_key_and_value(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_embedding_sizes_are_not_compared_by_the_config():
    """teacher.embedding_dim describes only a plain state dict; checkpoint, ONNX and
    TorchScript teachers carry their own size, so the sizes are compared when the objective
    is built from the loaded teacher (tests/scenarios/test_faults.py), not here."""
    cfg = load_config(None, ["teacher.path=t.pth", "teacher.embedding_dim=256"])
    assert (cfg.model.embedding_dim, cfg.teacher.embedding_dim, cfg.model.projector) == (512, 256, False)


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


def leaf_fields(cls=Config, prefix=""):
    """``(key, field)`` of every leaf of the schema, found without the module's own helpers."""
    for f in dataclasses.fields(cls):
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            yield from leaf_fields(type(sub), prefix + f.name + ".")
        else:
            yield prefix + f.name, f


def test_schema_reference_lists_every_leaf_key():
    keys = {row[0] for row in schema_reference()}
    assert keys == {key for key, _ in leaf_fields()}
    assert ("loss.balance.smoothing", "float", 0.5, "in (0, 1]",
            "share beta of the new value in each update, in log space: log w <- (1 - beta) log w "
            "+ beta log w* (E7)") in schema_reference()
    assert all(row[4] for row in schema_reference())


# Every key with a range rule, and the rule's text (the README table's 'allowed' column).
RULED_KEYS = {
    "model.embedding_dim": "in [1, 16384]", "model.width": "in (0, 4]", "model.dropout": "in [0, 1)",
    "model.name": "iresnet18/34/50/100/200, mobilefacenet or timm:<name>",
    "teacher.name": "iresnet18/34/50/100/200, mobilefacenet or timm:<name>",
    "teacher.embedding_dim": "in [1, 16384]", "teacher.width": "in (0, 4]",
    "teacher.min_accuracy": "in [0, 1)",
    "teacher.input_std": "> 0 or null",
    "teacher.onnx_backend": "one of auto, torch, onnxruntime",
    "teacher.cache_dtype": "one of float16, float32",
    "teacher.cache_placement": "one of auto, host, device",
    "data.format": "one of auto, folder, recordio", "data.loader": "one of auto, dali, torch",
    "data.decode_check": "one of auto, on, off", "data.batch_size": "> 0", "data.num_workers": ">= 0", "data.prefetch": "> 0",
    "loss.sphereface2.weight": ">= 0", "loss.sphereface2.lamb": "in (0, 1)",
    "loss.sphereface2.r": "> 0", "loss.sphereface2.m": ">= 0", "loss.sphereface2.t": "> 0",
    "loss.sphereface2.lw": "> 0", "loss.sphereface2.parallel": "one of replicated, class_sharded",
    "loss.iled.weight": ">= 0", "loss.iled.r": "> 0", "loss.iled.s": "in [-1, 1]",
    "loss.rpsd.weight": ">= 0", "loss.rpsd.r": "> 0", "loss.rpsd.t": "in [0, 2]",
    "loss.rpsd.student_anchor": "one of student_bank, teacher_bank, ema_student_bank",
    "loss.rpsd.ema_momentum": "in (0, 1)",
    "loss.balance.iled": ">= 0", "loss.balance.rpsd": ">= 0", "loss.balance.l2": ">= 0",
    "loss.balance.fc": ">= 0", "loss.balance.rkd": ">= 0", "loss.balance.smoothing": "in (0, 1]",
    "loss.balance.min_weight": "> 0", "loss.balance.max_weight": "> 0",
    "loss.bank.bank_factor": "> 0", "loss.bank.update": "one of fifo, random",
    "loss.l2.weight": ">= 0", "loss.fc.weight": ">= 0", "loss.rkd.weight": ">= 0",
    "loss.rkd.distance_weight": ">= 0", "loss.rkd.angle_weight": ">= 0",
    "optim.name": "one of sgd", "optim.lr": "> 0", "optim.momentum": "in [0, 1)",
    "optim.weight_decay": ">= 0", "optim.reference_batch": ">= 0", "optim.grad_clip": ">= 0",
    "optim.accumulation_steps": "> 0",
    "schedule.name": "one of multistep, cosine, poly", "schedule.total_steps": "> 0",
    "schedule.warmup_steps": ">= 0", "schedule.gamma": "> 0", "schedule.power": "> 0",
    "schedule.min_lr": ">= 0",
    "precision.amp": "one of bf16, fp16, fp32, off",
    "checkpoint.every_steps": "> 0", "checkpoint.keep_last": "> 0",
    "checkpoint.format": "one of file, dcp",
    "eval.every_steps": ">= 0", "eval.batch_size": "> 0",
    "logging.every_steps": "> 0", "logging.progress_bar": "one of auto, always, never",
    "logging.wandb_project": "1-128 characters, none of / \\ # ? % :",
    "logging.wandb_mode": "one of online, offline",
    "distributed.backend": "one of auto, nccl, gloo", "distributed.device": "one of auto, cuda, cpu",
    "distributed.timeout_s": "> 0",
    "run.max_nonfinite_steps": "> 0",
}


def test_every_key_is_declared_once_with_its_help_on_the_field():
    for key, f in leaf_fields():
        assert isinstance(f.metadata.get("help"), str) and f.metadata["help"], key
    meanings = {row[0]: row[4] for row in schema_reference()}
    assert meanings == {key: f.metadata["help"] for key, f in leaf_fields()}


def test_rule_table_is_derived_from_the_schema_and_keeps_every_rule():
    table = rules()
    assert {key: table[key].text for key in RULED_KEYS} == RULED_KEYS
    assert set(table) == set(RULED_KEYS)
    assert {row[0]: row[3] for row in schema_reference() if row[3]} == RULED_KEYS


def test_an_unknown_backbone_is_refused_by_the_config():
    """Before, model.name=iresnet19 passed `config validate` and --dry-run, and the run
    failed when building the model."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.name=iresnet19"])
    assert str(err.value) == ("config key 'model.name' must be iresnet18/34/50/100/200, "
                              "mobilefacenet or timm:<name>, got 'iresnet19'")
    with pytest.raises(ConfigError, match="config key 'teacher.name'"):
        load_config(None, ["teacher.name=resnet100"])
    assert load_config(None, ["model.name=timm:resnet18"]).model.name == "timm:resnet18"


def test_a_float_in_e_notation_is_a_float(tmp_path):
    """``1e-3`` is a string to PyYAML (YAML 1.1 wants a dot); the config reads it as a float,
    from a file and from the command line."""
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3
    assert load_config(write(tmp_path, "lr.yaml", "optim:\n  lr: 1e-3\n")).optim.lr == 1e-3


def test_a_choice_key_refuses_a_value_outside_its_choices(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.loader=cuda"])
    assert str(err.value) == ("command line: config key 'data.loader' must be one of auto, dali, "
                              "torch, got 'cuda'")
    path = write(tmp_path, "bad.yaml", "schedule:\n  name: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: config key 'schedule.name' must be one of multistep, "
                              f"cosine, poly, got 3")
    cfg = Config()
    cfg.logging.progress_bar = "sometimes"
    with pytest.raises(ConfigError, match="'logging.progress_bar' must be one of auto, always, "
                                          "never, got 'sometimes'"):
        validate(cfg)


def test_choice_keys_keep_their_type_name_and_values():
    rows = {row[0]: row for row in schema_reference()}
    assert rows["data.loader"][1:4] == ("str", "auto", "one of auto, dali, torch")
    assert load_config(None, ["data.loader=torch"]).data.loader == "torch"


def test_precision_off_is_an_alias_of_fp32(tmp_path):
    for value in ("bf16", "fp16", "fp32"):
        assert load_config(None, [f"precision.amp={value}"]).precision.amp == value
    cfg = load_config(None, ["precision.amp=off"])  # YAML 1.1 reads an unquoted off as False
    assert cfg.precision.amp == "fp32"
    assert from_dict(to_dict(cfg)) == cfg
    for text in ("precision:\n  amp: off\n", "precision:\n  amp: 'off'\n"):
        assert load_config(write(tmp_path, "off.yaml", text)).precision.amp == "fp32"
    with pytest.raises(ConfigError, match="'precision.amp' must be one of bf16, fp16, fp32, off, "
                                          "got True"):
        load_config(None, ["precision.amp=on"])


def test_help_of_the_bank_seed_and_of_the_learning_rate_scaling():
    meanings = {row[0]: row[4] for row in schema_reference()}
    assert meanings["loss.bank.seed"] == ("seed of the random bank update (loss.bank.update: "
                                          "random); the SphereFace2 head is initialized from "
                                          "run.seed")
    scaling = "(global batch x optim.accumulation_steps) / "
    assert scaling + "optim.reference_batch" in meanings["optim.lr"]
    assert scaling + "reference_batch" in meanings["optim.reference_batch"]


@pytest.mark.parametrize("text, override", [
    ("optim:\n  lr: .inf\n", "optim.lr=.inf"),
    ("optim:\n  lr: -.inf\n", "optim.lr=-.inf"),
    ("loss:\n  rpsd:\n    b: .nan\n", "loss.rpsd.b=.NaN"),
    ("teacher:\n  input_mean: .inf\n", "teacher.input_mean=.inf"),
    ("optim:\n  lr: 'inf'\n", "optim.lr=inf"),
])
def test_non_finite_numbers_are_refused_in_every_spelling(tmp_path, text, override):
    """Before, the strings 'inf'/'nan' were refused but the YAML floats .inf/.nan passed:
    optim.lr=.inf trained to non-finite weights and exited 0. The key ``loss.rpsd.b`` has no
    range rule, so only the finiteness rule refuses it."""
    key = override.split("=")[0]
    path = write(tmp_path, "c.yaml", text)
    for load, source in ((lambda: load_config(path), str(path)),
                         (lambda: load_config(None, [override]), "command line")):
        with pytest.raises(ConfigError) as err:
            load()
        assert re.fullmatch(rf"{re.escape(source)}: config key '{re.escape(key)}' must be a "
                            rf"finite number, got '?-?(inf|nan)'?", str(err.value)), str(err.value)
    with pytest.raises(ConfigError, match=r"'optim.lr' must be float, got 1000"):
        load_config(None, ["optim.lr=1" + "0" * 400])  # too large for a float


def test_an_alias_bomb_is_refused_before_it_is_built(tmp_path):
    """A 414-byte YAML whose anchors alias each other nine deep stands for 9**9 strings; before,
    ``config validate`` ran out of memory writing the value into its error message."""
    levels = ["a: &a [" + ", ".join(['"lol"'] * 9) + "]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    path = write(tmp_path, "bomb.yaml", "\n".join(levels) + "\n")
    assert path.stat().st_size == 414
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: the YAML's aliases (*name) expand to more than 100000 "
                              f"values; a config never needs that many")
    bomb = "[&a [1, 1], " + ", ".join(f"&{n} [" + ", ".join([f"*{p}"] * 10) + "]"
                                      for p, n in zip("abcdefgh", "bcdefghi")) + "]"
    with pytest.raises(ConfigError, match=r"^override eval\.bin_sets: the YAML's aliases"):
        load_config(None, [f"eval.bin_sets={bomb}"])
    recursive = write(tmp_path, "self.yaml", "eval:\n  bin_sets: &x [a, *x]\n")
    with pytest.raises(ConfigError, match="expand to more than 100000 values"):
        load_config(recursive)
    deep = write(tmp_path, "deep.yaml", "eval:\n  bin_sets: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(deep))}: the YAML is nested too deeply$"):
        load_config(deep)
    aliased = write(tmp_path, "ok.yaml", "eval:\n  bin_sets: &sets [a.bin]\n"
                                         "teacher:\n  check_sets: *sets\n")
    assert load_config(aliased).teacher.check_sets == ["a.bin"]  # plain aliases still work


def test_error_messages_show_a_bounded_part_of_the_value(tmp_path):
    """A bad value of any size is shown cut (a long string, a long or deep list, a long key)."""
    huge = [list(range(500)) for _ in range(100)]  # 50000 values, a 300 kB repr
    for value in ("x" * 100_000, huge, [[[[[[["deep"]]]]]]]):
        path = write(tmp_path, "v.yaml", yaml.safe_dump({"optim": {"lr": value}}))
        with pytest.raises(ConfigError) as err:
            load_config(path)
        message = str(err.value)
        assert message.startswith(f"{path}: config key 'optim.lr' must be float, got ")
        assert len(message) <= len(str(path)) + 200 and "\n" not in message, message
    path = write(tmp_path, "k.yaml", yaml.safe_dump({"optim": {"k" * 100_000: 1}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "unknown config key 'optim.kkk" in message and "k" * 120 not in message, message[:300]
    assert len(message) < 2000  # the path, the cut key and the schema's keys of 'optim'


@pytest.mark.parametrize("text", ["defaults: 3\n", "defaults: [[a.yaml]]\n",
                                  "defaults: {a: b}\n", "defaults: ['']\n"])
def test_defaults_that_are_not_file_names_are_one_line(tmp_path, text):
    """Before: a TypeError traceback (``3`` is not iterable, a list is no path)."""
    path = write(tmp_path, "d.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: 'defaults' must be a file name or a list of file "
                                     f"names, got ")


@pytest.mark.parametrize("override, message", [
    ("model.width=1e9", "config key 'model.width' must be in (0, 4], got 1000000000.0"),
    ("teacher.width=5", "config key 'teacher.width' must be in (0, 4], got 5.0"),
    ("model.embedding_dim=1000000000",
     "config key 'model.embedding_dim' must be in [1, 16384], got 1000000000"),
])
def test_a_huge_model_is_refused_by_the_config(override, message):
    """Before, model.width=1e9 passed the config and ``train`` ended in a RuntimeError traceback
    when the allocator was asked for 6.9 TB while the student was built."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message
    assert load_config(None, ["model.width=4", "model.embedding_dim=16384"]).model.width == 4.0


@pytest.mark.timeout(180)
def test_config_takes_a_list_from_an_override_or_yaml(two_sets, tmp_path):
    a, b = two_sets
    assert load_config(None, [f"data.train=[{a}, {b}]"]).data.train == [a, b]
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  train:\n    - {a}\n    - {b}\nloss:\n  iled: {{weight: 0}}\n"
                      f"  rpsd: {{weight: 0}}\n")
    cfg = load_config(config)
    assert cfg.data.train == [a, b]
    check_paths(cfg)
    with pytest.raises(ConfigError) as err:
        check_paths(load_config(config, [f"data.train=[{a}, {tmp_path / 'gone'}]"]))
    assert str(err.value) == f"config key 'data.train[1]': path not found: {tmp_path / 'gone'}"
    with pytest.raises(ConfigError) as err:
        check_paths(load_config(config, [f"data.train=[{a}, '']"]))
    assert str(err.value) == "config key 'data.train[1]' is empty: name an image folder or train.rec"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.train=5"])
    assert str(err.value) == "command line: config key 'data.train' must be str or list, got 5"
    with pytest.raises(ConfigError, match=r"config key 'data.train\[1\]' must be str, got 3"):
        load_config(None, [f"data.train=[{a}, 3]"])


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


@pytest.mark.parametrize("name, changed", [
    ("sweeps/iled_s0.5", {"loss.iled.s": 0.5}), ("sweeps/iled_s0.7", {"loss.iled.s": 0.7}),
    ("sweeps/iled_s0.9", {}), ("sweeps/iled_r20", {"loss.iled.r": 20.0}),
    ("sweeps/iled_r40", {}), ("sweeps/iled_r60", {"loss.iled.r": 60.0}),
    ("sweeps/rpsd_t0.05", {}), ("sweeps/rpsd_t0.10", {"loss.rpsd.t": 0.10}),
    ("sweeps/rpsd_t0.15", {"loss.rpsd.t": 0.15}),
    ("teacher_gap/iresnet100", {}), ("teacher_gap/iresnet50", {"teacher.name": "iresnet50"}),
    ("teacher_gap/dpn98", {"teacher.name": "timm:dpn98"})])
def test_sweep_and_teacher_gap_configs_change_only_their_keys(name, changed):
    from conftest import REPO
    from fr_distill.config import load_config, to_dict

    base = _leaves(to_dict(load_config(REPO / "configs" / "vggface2_r100_r18_unified.yaml")))
    cfg = _leaves(to_dict(load_config(REPO / "configs" / f"{name}.yaml")))
    diff = {k: v for k, v in cfg.items() if v != base[k]}
    assert diff == {"run.output_dir": f"runs/{name}", **changed}


@pytest.mark.parametrize("overrides, message", [
    (["loss.rpsd.weight=0", "loss.balance.rpsd=0.5"],
     "config key 'loss.balance.rpsd' sets a target (0.5) for a term that is off "
     "(loss.rpsd.weight=0)"),
    (["loss.balance.enabled=true", "loss.balance.iled=0.3"],
     "config key 'loss.balance.rpsd' must be > 0 with loss.balance.enabled and "
     "loss.rpsd.weight > 0 (every enabled distillation term is balanced), got 0"),
    (["loss.balance.iled=-1"], "config key 'loss.balance.iled' must be >= 0, got -1.0"),
    (["loss.balance.min_weight=10", "loss.balance.max_weight=1"],
     "config key 'loss.balance.min_weight' (10) must be < loss.balance.max_weight (1)"),
    (["loss.balance.smoothing=0"], "config key 'loss.balance.smoothing' must be in (0, 1]"),
    (["loss.balance.enabled=true", "loss.iled.weight=0", "loss.rpsd.weight=0"],
     "config key 'loss.balance.enabled' is true but no distillation term is enabled"),
    (["loss.rpsd.student_anchor=ema", ],
     "config key 'loss.rpsd.student_anchor' must be one of student_bank, teacher_bank, "
     "ema_student_bank"),
    (["loss.rpsd.ema_momentum=1"], "config key 'loss.rpsd.ema_momentum' must be in (0, 1)"),
])
def test_bad_balance_and_anchor_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)
