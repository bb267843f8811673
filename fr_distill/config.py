"""Typed configuration: one dataclass schema for the whole system.

A run is described by a YAML file (``configs/*.yaml``) plus dotted command-line overrides
(``loss.rpsd.weight=20``). Loading goes: defaults → YAML (``defaults:`` list of base files,
merged in order, then the file itself) → overrides → type coercion → range validation.
Every error is a :class:`ConfigError` whose one-line message names the key (and the file):
unknown keys come with the closest valid ones, wrong types and out-of-range values with
the offending value. :func:`check_paths` verifies that input files exist; the trainer calls
it before it builds any model.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message is one line naming the key or file."""


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """The student backbone (METHOD §3)."""

    name: str = "iresnet18"  # iresnet18..iresnet200, mobilefacenet, timm:<name>
    embedding_dim: int = 512
    width: float = 1.0  # channel multiplier; 1.0 is the published layout
    dropout: float = 0.0
    projector: bool = False  # linear map student dim -> teacher dim (needed when they differ)
    channels_last: bool = True
    compile: bool = False  # torch.compile the student
    freeze_bn: bool = False  # BatchNorm normalizes with its running statistics, never updated


@dataclass
class TeacherConfig:
    """The frozen teacher. ``path`` empty means no teacher (plain training)."""

    path: str = ""  # InsightFace .pth, fr_distill checkpoint, .onnx, TorchScript
    name: str = "iresnet100"  # architecture for state-dict files
    embedding_dim: int = 512
    width: float = 1.0
    onnx_backend: str = "auto"  # auto | torch | onnxruntime
    compile: bool = False


@dataclass
class DataConfig:
    """Training data (METHOD §4)."""

    train: str = ""  # image folder, a train.rec, or a folder holding train.rec/train.idx
    format: str = "auto"  # auto | folder | recordio
    loader: str = "auto"  # auto (DALI if installed) | dali | torch
    batch_size: int = 64  # per rank
    num_workers: int = 2
    prefetch: int = 2
    flip: bool = True
    skip_bad: bool = False  # skip records the pre-flight check lists as bad (counted, logged)
    preflight: bool = True  # headers-and-sizes check of every record before training


@dataclass
class SphereFace2Config:
    """METHOD (E1). ``lamb`` is SphereFace2's λ (positive/negative balance)."""

    weight: float = 1.0
    lamb: float = 0.7
    r: float = 40.0
    m: float = 0.4
    t: float = 3.0
    lw: float = 10.0
    parallel: str = "replicated"  # replicated | class_sharded


@dataclass
class ILEDConfig:
    """METHOD (E2)."""

    weight: float = 1.0
    r: float = 40.0
    s: float = 0.9
    b: float = 0.1
    distance_weighting: bool = True


@dataclass
class RPSDConfig:
    """METHOD (E4)."""

    weight: float = 40.0
    r: float = 60.0
    t: float = 0.05
    b: float = 1.0
    student_anchor: str = "student_bank"  # student_bank | teacher_bank


@dataclass
class BankConfig:
    """METHOD (E3)."""

    bank_factor: int = 3  # Q = bank_factor * global batch
    update: str = "fifo"  # fifo | random
    seed: int = 0


@dataclass
class WeightedTerm:
    """A baseline KD term of METHOD (E6): enabled when ``weight`` > 0."""

    weight: float = 0.0


@dataclass
class RKDConfig:
    """Relational KD (METHOD E6): distance and angle terms."""

    weight: float = 0.0
    distance_weight: float = 1.0
    angle_weight: float = 2.0


@dataclass
class LossConfig:
    """The unified objective, METHOD (E5): a weighted sum of terms; weight 0 disables a term."""

    sphereface2: SphereFace2Config = field(default_factory=SphereFace2Config)
    iled: ILEDConfig = field(default_factory=ILEDConfig)
    rpsd: RPSDConfig = field(default_factory=RPSDConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    l2: WeightedTerm = field(default_factory=WeightedTerm)
    fc: WeightedTerm = field(default_factory=WeightedTerm)
    rkd: RKDConfig = field(default_factory=RKDConfig)


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    no_decay_bn_bias: bool = False
    reference_batch: int = 0  # >0: lr scaled by global_batch / reference_batch
    grad_clip: float = 0.0  # max global grad norm; 0 disables
    accumulation_steps: int = 1
    fused: bool = True  # torch's fused SGD where the device supports it


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, in optimizer steps."""

    name: str = "multistep"  # multistep | cosine | poly
    total_steps: int = 80000
    warmup_steps: int = 0
    milestones: list[int] = field(default_factory=lambda: [40000, 60000, 70000])
    gamma: float = 0.1
    power: float = 2.0
    min_lr: float = 0.0


@dataclass
class PrecisionConfig:
    amp: str = "bf16"  # bf16 | fp16 | fp32 (bf16 falls back to fp32 where unsupported)


@dataclass
class CheckpointConfig:
    every_steps: int = 2000
    keep_last: int = 3
    resume: bool = True  # auto-resume from the newest valid checkpoint in the run directory


@dataclass
class EvalConfig:
    bin_sets: list[str] = field(default_factory=list)  # .bin files evaluated periodically
    every_steps: int = 0  # 0: only at the end
    batch_size: int = 128
    best_metric: str = ""  # e.g. "lfw/accuracy_mean"; empty: no best checkpoint


@dataclass
class LoggingConfig:
    every_steps: int = 50
    tensorboard: bool = True
    progress_bar: str = "auto"  # auto (when interactive) | always | never
    diagnostics: bool = True  # per-term gradient norms and shares on logging steps


@dataclass
class DistributedConfig:
    backend: str = "auto"  # auto | nccl | gloo
    device: str = "auto"  # auto | cuda | cpu
    timeout_s: float = 1800.0


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    max_nonfinite_steps: int = 5  # consecutive non-finite losses before stopping
    deterministic: bool = False


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# --------------------------------------------------------------------------------------
# Validation rules: (key, predicate, what it must be)
# --------------------------------------------------------------------------------------
def _one_of(*choices):
    return (lambda v: v in choices), "one of " + ", ".join(choices)


_POSITIVE = (lambda v: v > 0), "> 0"
_NON_NEGATIVE = (lambda v: v >= 0), ">= 0"
_PROBABILITY_OPEN = (lambda v: 0 < v < 1), "in (0, 1)"

RULES: dict[str, tuple] = {
    "model.embedding_dim": _POSITIVE,
    "model.width": _POSITIVE,
    "model.dropout": ((lambda v: 0 <= v < 1), "in [0, 1)"),
    "teacher.embedding_dim": _POSITIVE,
    "teacher.width": _POSITIVE,
    "teacher.onnx_backend": _one_of("auto", "torch", "onnxruntime"),
    "data.format": _one_of("auto", "folder", "recordio"),
    "data.loader": _one_of("auto", "dali", "torch"),
    "data.batch_size": _POSITIVE,
    "data.num_workers": _NON_NEGATIVE,
    "data.prefetch": _POSITIVE,
    "loss.sphereface2.weight": _NON_NEGATIVE,
    "loss.sphereface2.lamb": _PROBABILITY_OPEN,
    "loss.sphereface2.r": _POSITIVE,
    "loss.sphereface2.m": _NON_NEGATIVE,
    "loss.sphereface2.t": _POSITIVE,
    "loss.sphereface2.lw": _POSITIVE,
    "loss.sphereface2.parallel": _one_of("replicated", "class_sharded"),
    "loss.iled.weight": _NON_NEGATIVE,
    "loss.iled.r": _POSITIVE,
    "loss.iled.s": ((lambda v: -1 <= v <= 1), "in [-1, 1]"),
    "loss.rpsd.weight": _NON_NEGATIVE,
    "loss.rpsd.r": _POSITIVE,
    "loss.rpsd.t": ((lambda v: 0 <= v <= 2), "in [0, 2]"),
    "loss.rpsd.student_anchor": _one_of("student_bank", "teacher_bank"),
    "loss.bank.bank_factor": _POSITIVE,
    "loss.bank.update": _one_of("fifo", "random"),
    "loss.l2.weight": _NON_NEGATIVE,
    "loss.fc.weight": _NON_NEGATIVE,
    "loss.rkd.weight": _NON_NEGATIVE,
    "loss.rkd.distance_weight": _NON_NEGATIVE,
    "loss.rkd.angle_weight": _NON_NEGATIVE,
    "optim.name": _one_of("sgd"),
    "optim.lr": _POSITIVE,
    "optim.momentum": ((lambda v: 0 <= v < 1), "in [0, 1)"),
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.reference_batch": _NON_NEGATIVE,
    "optim.grad_clip": _NON_NEGATIVE,
    "optim.accumulation_steps": _POSITIVE,
    "schedule.name": _one_of("multistep", "cosine", "poly"),
    "schedule.total_steps": _POSITIVE,
    "schedule.warmup_steps": _NON_NEGATIVE,
    "schedule.gamma": _POSITIVE,
    "schedule.power": _POSITIVE,
    "schedule.min_lr": _NON_NEGATIVE,
    "precision.amp": _one_of("bf16", "fp16", "fp32"),
    "checkpoint.every_steps": _POSITIVE,
    "checkpoint.keep_last": _POSITIVE,
    "eval.every_steps": _NON_NEGATIVE,
    "eval.batch_size": _POSITIVE,
    "logging.every_steps": _POSITIVE,
    "logging.progress_bar": _one_of("auto", "always", "never"),
    "distributed.backend": _one_of("auto", "nccl", "gloo"),
    "distributed.device": _one_of("auto", "cuda", "cpu"),
    "distributed.timeout_s": _POSITIVE,
    "run.max_nonfinite_steps": _POSITIVE,
}


# What each key means (the README's configuration reference).
DESCRIPTIONS: dict[str, str] = {
    "run.output_dir": "run directory: resolved config, checkpoints, TensorBoard logs; a run resumes from it",
    "run.seed": "seed of the weights, the sampler (order, flips) and every other random draw",
    "run.max_nonfinite_steps": "consecutive non-finite losses (steps skipped) before the run stops",
    "run.deterministic": "deterministic kernels (slower) instead of cuDNN autotuning",
    "model.name": "student backbone: iresnet18/34/50/100/200, mobilefacenet, timm:<name>",
    "model.embedding_dim": "student embedding size D",
    "model.width": "channel multiplier of the backbone; 1.0 is the published layout",
    "model.dropout": "dropout before the embedding layer",
    "model.projector": "learn a linear map student D -> teacher D for the distillation terms (needed when they differ)",
    "model.channels_last": "channels-last memory format (faster convolutions on tensor cores)",
    "model.compile": "torch.compile the student",
    "model.freeze_bn": "keep the student BatchNorm layers on its running statistics (batch-statistics-free training)",
    "teacher.path": "teacher file: InsightFace state dict, fr_distill checkpoint, ONNX or TorchScript; empty = no teacher",
    "teacher.name": "teacher architecture for a plain state dict",
    "teacher.embedding_dim": "teacher embedding size for a plain state dict",
    "teacher.width": "teacher channel multiplier for a plain state dict",
    "teacher.onnx_backend": "ONNX teacher: auto (onnx2torch when verified, else onnxruntime), torch, onnxruntime",
    "teacher.compile": "torch.compile the teacher",
    "data.train": "training set: image folder, train.rec, or a folder holding train.rec/train.idx",
    "data.format": "training set format (auto: from what data.train holds)",
    "data.loader": "input pipeline: auto (DALI when installed), dali, torch",
    "data.batch_size": "images per rank per micro-step (global batch = batch_size x ranks)",
    "data.num_workers": "reader/decoder worker processes per rank",
    "data.prefetch": "batches prepared ahead of the step",
    "data.flip": "random horizontal flip (seeded per sample)",
    "data.skip_bad": "skip the records the pre-flight check finds bad (counted and logged) instead of stopping",
    "data.preflight": "check headers and sizes of every record before training",
    "loss.sphereface2.weight": "weight of the SphereFace2 loss (E1)",
    "loss.sphereface2.lamb": "SphereFace2 lambda: balance of positive and negative terms (E1)",
    "loss.sphereface2.r": "SphereFace2 scale r (E1)",
    "loss.sphereface2.m": "SphereFace2 margin m (E1)",
    "loss.sphereface2.t": "SphereFace2 similarity adjustment t (E1)",
    "loss.sphereface2.lw": "SphereFace2 loss weight lw (E1)",
    "loss.sphereface2.parallel": "replicated head, or classes split across ranks (class_sharded, for millions of identities)",
    "loss.iled.weight": "lambda_ILED (E2, E5); 0 disables ILED",
    "loss.iled.r": "ILED steepness r (E2)",
    "loss.iled.s": "ILED target cosine s (E2)",
    "loss.iled.b": "ILED bias b (E2)",
    "loss.iled.distance_weighting": "weight samples by (1 - c_i) / mean over the global batch (E2)",
    "loss.rpsd.weight": "lambda_RPSD (E4, E5); 0 disables RPSD and the memory bank",
    "loss.rpsd.r": "RPSD steepness r' (E4)",
    "loss.rpsd.t": "RPSD tolerance t (E4)",
    "loss.rpsd.b": "RPSD bias b' (E4)",
    "loss.rpsd.student_anchor": "student similarities against the student bank or the teacher bank (E4)",
    "loss.bank.bank_factor": "memory bank rows Q = bank_factor x global batch (E3)",
    "loss.bank.update": "bank overwrite order: fifo, or random rows (seeded) (E3)",
    "loss.bank.seed": "seed of the random bank update and of the head initialization",
    "loss.l2.weight": "weight of raw L2 feature distillation (E6)",
    "loss.fc.weight": "weight of feature consistency 1 - c_i (E6)",
    "loss.rkd.weight": "weight of relational KD (E6)",
    "loss.rkd.distance_weight": "RKD distance-term weight (E6)",
    "loss.rkd.angle_weight": "RKD angle-term weight (E6)",
    "optim.name": "optimizer",
    "optim.lr": "learning rate (at optim.reference_batch when that is set)",
    "optim.momentum": "SGD momentum",
    "optim.weight_decay": "weight decay",
    "optim.no_decay_bn_bias": "no weight decay on BatchNorm parameters and biases",
    "optim.reference_batch": "> 0: lr scaled by (global batch x accumulation) / reference_batch",
    "optim.grad_clip": "maximum global gradient norm; 0 disables clipping",
    "optim.accumulation_steps": "micro-steps per optimizer step (loss divided, schedule stepped per optimizer step)",
    "optim.fused": "the fused SGD kernel where the device supports it",
    "schedule.name": "learning-rate schedule",
    "schedule.total_steps": "optimizer steps of the run",
    "schedule.warmup_steps": "linear warmup steps",
    "schedule.milestones": "multistep: steps where lr is multiplied by gamma",
    "schedule.gamma": "multistep decay factor",
    "schedule.power": "poly: exponent of the decay",
    "schedule.min_lr": "cosine/poly: final learning rate",
    "precision.amp": "autocast dtype of teacher and student (losses always float32); fp16 uses a GradScaler",
    "checkpoint.every_steps": "checkpoint period in optimizer steps (and one at the end)",
    "checkpoint.keep_last": "checkpoints kept",
    "checkpoint.resume": "resume from the newest valid checkpoint of run.output_dir",
    "eval.bin_sets": ".bin verification sets evaluated during training",
    "eval.every_steps": "evaluation period; 0 = only at the end",
    "eval.batch_size": "images per rank per evaluation batch",
    "eval.best_metric": "metric that selects best.pt, e.g. synth_lfw/accuracy_mean; empty = none",
    "logging.every_steps": "console/TensorBoard logging period",
    "logging.tensorboard": "write TensorBoard scalars",
    "logging.progress_bar": "progress bar: auto (when stderr is a terminal), always, never",
    "logging.diagnostics": "on logging steps, each term's gradient norm and share on the student embeddings, and ILED/RPSD mining fractions (METHOD D1)",
    "distributed.backend": "process-group backend: auto (NCCL with CUDA, else gloo)",
    "distributed.device": "auto (cuda:LOCAL_RANK when CUDA is available), cuda, cpu",
    "distributed.timeout_s": "collective timeout in seconds",
}


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields_of(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown_key(key: str, cls, source: str) -> ConfigError:
    section, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, _fields_of(cls), n=3, cutoff=0.5)
    prefix = section + "." if section else ""
    hint = ("; did you mean " + " or ".join(prefix + c for c in close) + "?") if close else (
        "; valid keys: " + ", ".join(prefix + c for c in _fields_of(cls)))
    return ConfigError(f"{source}: unknown config key '{key}'{hint}")


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check/convert ``value`` to the annotated type ``hint``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, source)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    bad = ConfigError(f"{source}: config key '{key}' must be {getattr(hint, '__name__', hint)},"
                      f" got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise bad from None
            if not math.isfinite(number):
                raise bad
            return number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise bad


def _merge(node: Any, cls, data: dict, prefix: str, source: str) -> None:
    """Apply the mapping ``data`` onto the dataclass instance ``node`` (in place)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: config section '{prefix.rstrip('.') or '<root>'}' "
                          f"must be a mapping, got {data!r}")
    hints = _hints(cls)
    for name, value in data.items():
        key = prefix + str(name)
        if name not in hints:
            raise _unknown_key(key, cls, source)
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            _merge(getattr(node, name), hint, value, key + ".", source)
        else:
            setattr(node, name, _coerce(value, hint, key, source))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """The mappings to merge for ``path``: its ``defaults:`` files first, then itself."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'defaults' include")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    bases = data.pop("defaults", []) or []
    if isinstance(bases, str):
        bases = [bases]
    layers: list[tuple[dict, str]] = []
    for base in bases:
        layers += _read_yaml(path.parent / base, seen + (path,))
    layers.append((data, str(path)))
    return layers


def parse_override(text: str) -> tuple[str, Any]:
    """``'loss.rpsd.weight=20'`` → ``('loss.rpsd.weight', 20)`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. loss.rpsd.weight=20)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def validate(cfg: Config) -> Config:
    """Range and consistency checks; raises :class:`ConfigError` naming the key."""
    for key, (ok, what) in RULES.items():
        value = get_key(cfg, key)
        if not ok(value):
            raise ConfigError(f"config key '{key}' must be {what}, got {value!r}")
    if sorted(cfg.schedule.milestones) != list(cfg.schedule.milestones):
        raise ConfigError(f"config key 'schedule.milestones' must be increasing, "
                          f"got {cfg.schedule.milestones!r}")
    if cfg.schedule.warmup_steps >= cfg.schedule.total_steps:
        raise ConfigError(f"config key 'schedule.warmup_steps' must be < schedule.total_steps "
                          f"({cfg.schedule.total_steps}), got {cfg.schedule.warmup_steps}")
    if (cfg.teacher.path and cfg.model.embedding_dim != cfg.teacher.embedding_dim
            and not cfg.model.projector):
        raise ConfigError(f"config key 'model.embedding_dim' ({cfg.model.embedding_dim}) differs "
                          f"from teacher.embedding_dim ({cfg.teacher.embedding_dim}); set "
                          f"model.projector=true to learn a linear projector")
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file (with its ``defaults:`` bases), then dotted overrides."""
    cfg = Config()
    if path is not None:
        for data, source in _read_yaml(Path(path)):
            _merge(cfg, Config, data, "", source)
    for text in overrides:
        key, value = parse_override(text)
        _merge(cfg, Config, _nest(key, value), "", "command line")
    return validate(cfg)


def get_key(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, source: str = "checkpoint") -> Config:
    """Rebuild a :class:`Config` from :func:`to_dict` output (e.g. a checkpoint's copy)."""
    cfg = Config()
    _merge(cfg, Config, data, "", source)
    return validate(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (into every run directory)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


KD_TERMS = ("iled", "rpsd", "l2", "fc", "rkd")


def check_paths(cfg: Config) -> None:
    """Fail before any model is built when an input the config names is missing.

    Also refuses distillation terms without a teacher (a config may omit the teacher path
    and receive it as an override, so this is checked here, not in :func:`validate`).
    """
    if not cfg.data.train:
        raise ConfigError("config key 'data.train' is empty: name an image folder or train.rec")
    kd_terms = [n for n in KD_TERMS if get_key(cfg, f"loss.{n}.weight") > 0]
    if kd_terms and not cfg.teacher.path:
        raise ConfigError(f"config key 'teacher.path' is empty but distillation terms "
                          f"{', '.join('loss.' + t for t in kd_terms)} have weight > 0")
    wanted = [("data.train", cfg.data.train)]
    if cfg.teacher.path:
        wanted.append(("teacher.path", cfg.teacher.path))
    wanted += [(f"eval.bin_sets[{i}]", p) for i, p in enumerate(cfg.eval.bin_sets)]
    for key, p in wanted:
        if not os.path.exists(p):
            raise ConfigError(f"config key '{key}': path not found: {p}")


def schema_reference() -> list[tuple[str, str, Any, str, str]]:
    """``(key, type, default, rule, meaning)`` for every leaf key: the README's configuration table."""
    rows: list[tuple[str, str, Any, str, str]] = []

    def walk(cls, prefix: str) -> None:
        defaults = cls()
        for name, hint in _hints(cls).items():
            key = prefix + name
            if dataclasses.is_dataclass(hint):
                walk(hint, key + ".")
                continue
            rule = RULES.get(key, (None, ""))[1]
            type_name = getattr(hint, "__name__", str(hint)).replace("typing.", "")
            rows.append((key, type_name, getattr(defaults, name), rule, DESCRIPTIONS[key]))

    walk(Config, "")
    return rows


__all__ = ["Config", "ConfigError", "load_config", "validate", "check_paths", "save_config",
           "to_dict", "from_dict", "get_key", "parse_override", "schema_reference"]
