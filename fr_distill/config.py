"""Typed configuration: one dataclass schema for the whole system.

A run is described by a YAML file (``configs/*.yaml``) plus dotted command-line overrides
(``loss.rpsd.weight=20``). Loading goes: defaults → YAML (``defaults:`` list of base files,
merged in order, then the file itself) → overrides → type coercion → range validation.
Every error is a :class:`ConfigError` whose one-line message names the key (and the file):
unknown keys come with the closest valid ones, wrong types and out-of-range values with
the offending value. :func:`check_paths` verifies that input files exist; the trainer calls
it before it builds any model.

Each key is declared once, as a dataclass field made by :func:`setting`: its type (a
``Literal`` for a fixed set of choices), default, help text and range rule. The rule table
(:func:`rules`), the README's reference table (:func:`schema_reference`) and the hints for
unknown keys are all read from these fields.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import reprlib
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml

from fr_distill.backbones import is_backbone_name
from fr_distill.errors import FrDistillError


class ConfigError(FrDistillError, ValueError):
    """A configuration problem; the message is one line naming the key or file."""


# --------------------------------------------------------------------------------------
# Declaring a key: default, help text and range rule on the dataclass field
# --------------------------------------------------------------------------------------
class Rule(NamedTuple):
    """A range rule: ``check(value)`` holds for allowed values; ``text`` says which (``> 0``)."""

    check: Callable[[Any], bool]
    text: str


POSITIVE = Rule(lambda v: v > 0, "> 0")
NON_NEGATIVE = Rule(lambda v: v >= 0, ">= 0")
OPEN_UNIT = Rule(lambda v: 0 < v < 1, "in (0, 1)")
FRACTION = Rule(lambda v: 0 <= v < 1, "in [0, 1)")
# a wider backbone or a longer embedding than these is no face model (width 1e9 asked the
# allocator for 6.9 TB while building the model); the published layouts are width 1, D 512
WIDTH = Rule(lambda v: 0 < v <= 4, "in (0, 4]")
EMBEDDING_DIM = Rule(lambda v: 1 <= v <= 16384, "in [1, 16384]")


BACKBONE = Rule(is_backbone_name, "iresnet18/34/50/100/200, mobilefacenet or timm:<name>")
# what wandb accepts as a project name
WANDB_PROJECT = Rule(lambda v: 0 < len(v) <= 128 and not set(v) & set("/\\#?%:"),
                     "1-128 characters, none of / \\ # ? % :")


def setting(default: Any, help: str, rule: Rule | None = None,
            aliases: dict[str, str] | None = None) -> Any:
    """A leaf config key: its default, its help text (the README's "meaning") and its rule.

    Keys with a fixed set of values declare them as a ``Literal`` type instead of a rule.
    ``aliases`` maps an accepted spelling to the value stored, so the rest of the system
    sees only the canonical one. A list default is copied for every instance.
    """
    metadata = {"help": help, "rule": rule, "aliases": aliases or {}}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """The student backbone (METHOD §3)."""

    name: str = setting("iresnet18", "student backbone", BACKBONE)
    embedding_dim: int = setting(512, "student embedding size D", EMBEDDING_DIM)
    width: float = setting(1.0, "channel multiplier of the backbone; 1.0 is the published layout",
                           WIDTH)
    dropout: float = setting(0.0, "dropout before the embedding layer", FRACTION)
    projector: bool = setting(False, "learn a linear map student D -> teacher D for the "
                                     "distillation terms (needed when they differ)")
    channels_last: bool = setting(True, "channels-last memory format (faster convolutions on "
                                        "tensor cores)")
    compile: bool = setting(False, "torch.compile the student")
    freeze_bn: bool = setting(False, "keep the student BatchNorm layers on its running statistics "
                                     "(batch-statistics-free training)")
    init: str = setting("", "weights file a fresh run starts the student from (fr_distill "
                            "checkpoint of the same backbone and width, or InsightFace state dict), "
                            "loaded strictly; a resumed run ignores it; empty = random "
                            "initialization")
    init_skip: list[str] = setting([], "patterns (fnmatch) of student parameter and buffer names "
                                       "model.init leaves at their fresh initialization, e.g. "
                                       "[features.*, fc.*] for another embedding size")


@dataclass
class TeacherConfig:
    """The frozen teacher. ``path`` empty means no teacher (plain training)."""

    path: str = setting("", "teacher file: InsightFace state dict, fr_distill checkpoint, ONNX or "
                            "TorchScript; empty = no teacher")
    name: str = setting("iresnet100", "teacher architecture for a plain state dict", BACKBONE)
    embedding_dim: int = setting(512, "teacher embedding size for a plain state dict",
                                 EMBEDDING_DIM)
    width: float = setting(1.0, "teacher channel multiplier for a plain state dict", WIDTH)
    onnx_backend: Literal["auto", "torch", "onnxruntime"] = setting(
        "auto", "ONNX teacher: auto (onnx2torch when verified, else onnxruntime), torch, "
                "onnxruntime")
    compile: bool = setting(False, "torch.compile the teacher")
    input_mean: float | None = setting(None, "the teacher's input is (pixels - input_mean) / "
                                             "input_std; null: (pixels - 127.5) / 127.5, or raw "
                                             "pixels for an ONNX graph that normalizes itself")
    input_std: float | None = setting(None, "see teacher.input_mean (null: automatic)",
                                      Rule(lambda v: v is None or v > 0, "> 0 or null"))
    check_sets: list[str] = setting([], ".bin sets the teacher is evaluated on before the first "
                                        "step of a fresh run (logged); empty: eval.bin_sets")
    min_accuracy: float = setting(0.0, "stop before the first step when the teacher's 10-fold "
                                       "accuracy on a check set is below this; 0: only log it",
                                  FRACTION)
    cache: str = setting("", "teacher-embedding cache directory (fr-distill cache-teacher writes "
                             "it): training reads the teacher's rows from it instead of running "
                             "the teacher; empty: the teacher runs every step")
    cache_dtype: Literal["float16", "float32"] = setting(
        "float16", "storage of the cached rows (float32: bitwise the teacher's float32 output)")
    cache_verify_content: bool = setting(
        False, "the build records the sha256 of every training image's bytes and a run reading "
               "the cache hashes them again before training, refusing a cache built from other "
               "images under the same names (costs a read of every image; off: the cache is "
               "tied to the sample list, file names or RecordIO index, and the labels, not to "
               "the images' bytes)")
    cache_placement: Literal["auto", "host", "device"] = setting(
        "auto", "where training keeps the cached rows: host (memory-mapped, copied per batch from "
                "pinned memory), device (all in GPU memory), auto (device when they take at most "
                "a quarter of its free memory)")


@dataclass
class DataConfig:
    """Training data (METHOD §4)."""

    train: str | list[str] = setting("", "training set: image folder, train.rec, or a folder "
                                         "holding train.rec/train.idx; a list of them trains on "
                                         "all, identities numbered set after set")
    format: Literal["auto", "folder", "recordio"] = setting(
        "auto", "training set format, for every data.train entry (auto: each from what it "
                "holds)")
    loader: Literal["auto", "dali", "torch"] = setting(
        "auto", "input pipeline: auto (DALI when installed), dali, torch")
    batch_size: int = setting(64, "images per rank per micro-step (global batch = batch_size x "
                                  "ranks)", POSITIVE)
    num_workers: int = setting(2, "reader/decoder worker processes per rank", NON_NEGATIVE)
    prefetch: int = setting(2, "batches prepared ahead of the step", POSITIVE)
    flip: bool = setting(True, "random horizontal flip (seeded per sample)")
    skip_bad: bool = setting(False, "skip the records the pre-flight check finds bad (counted and "
                                    "logged) instead of stopping")
    preflight: bool = setting(True, "check headers and sizes of every record before training")
    decode_check: Literal["auto", "on", "off"] = setting(
        "auto", "decode every training image once before training (strict libjpeg-turbo, "
                "data.num_workers processes) to find corrupt image data the header check cannot "
                "see; auto: with the DALI loader (whose decoder only warns about it) or "
                "data.skip_bad")


@dataclass
class SphereFace2Config:
    """METHOD (E1). ``lamb`` is SphereFace2's λ (positive/negative balance)."""

    weight: float = setting(1.0, "weight of the SphereFace2 loss (E1)", NON_NEGATIVE)
    lamb: float = setting(0.7, "SphereFace2 lambda: balance of positive and negative terms (E1)",
                          OPEN_UNIT)
    r: float = setting(40.0, "SphereFace2 scale r (E1)", POSITIVE)
    m: float = setting(0.4, "SphereFace2 margin m (E1)", NON_NEGATIVE)
    t: float = setting(3.0, "SphereFace2 similarity adjustment t (E1)", POSITIVE)
    lw: float = setting(10.0, "SphereFace2 loss weight lw (E1)", POSITIVE)
    parallel: Literal["replicated", "class_sharded"] = setting(
        "replicated", "replicated head, or classes split across ranks (class_sharded, for "
                      "millions of identities)")


@dataclass
class ILEDConfig:
    """METHOD (E2)."""

    weight: float = setting(7.0, "lambda_ILED (E2, E5); 0 disables ILED. 7 = SphereFace2's lw x "
                                 "lambda, its gradient per unit of cosine (the reading the study "
                                 "supports, METHOD §8); 1 is the literal reading", NON_NEGATIVE)
    r: float = setting(40.0, "ILED steepness r (E2)", POSITIVE)
    s: float = setting(0.9, "ILED target cosine s (E2)", Rule(lambda v: -1 <= v <= 1, "in [-1, 1]"))
    b: float = setting(0.1, "ILED bias b (E2)")
    distance_weighting: bool = setting(True, "weight samples by (1 - c_i) / mean over the global "
                                             "batch (E2)")


@dataclass
class RPSDConfig:
    """METHOD (E4)."""

    weight: float = setting(40.0, "lambda_RPSD (E4, E5); 0 disables RPSD and the memory bank",
                            NON_NEGATIVE)
    r: float = setting(60.0, "RPSD steepness r' (E4)", POSITIVE)
    t: float = setting(0.05, "RPSD tolerance t (E4)", Rule(lambda v: 0 <= v <= 2, "in [0, 2]"))
    b: float = setting(1.0, "RPSD bias b' (E4)")
    student_anchor: Literal["student_bank", "teacher_bank", "ema_student_bank"] = setting(
        "teacher_bank", "what the student's similarities S^s are taken against: the teacher's "
                        "bank rows (teacher_bank, the reading the study supports, METHOD §8), "
                        "its own past embeddings (student_bank, the literal reading), or those "
                        "of a momentum (EMA) copy of the student (ema_student_bank) (E4)")
    ema_momentum: float = setting(0.99, "momentum m of the EMA student that fills the student "
                                        "bank with student_anchor=ema_student_bank: after each "
                                        "optimizer step theta_ema = m theta_ema + (1 - m) theta "
                                        "(E4)", OPEN_UNIT)


@dataclass
class BankConfig:
    """METHOD (E3)."""

    bank_factor: int = setting(3, "memory bank rows Q = bank_factor x the rows of one optimizer "
                                  "step (global batch x accumulation steps) (E3)", POSITIVE)
    update: Literal["fifo", "random"] = setting(
        "fifo", "bank overwrite order: fifo, or random rows (seeded) (E3)")
    seed: int = setting(0, "seed of the random bank update (loss.bank.update: random); the "
                           "SphereFace2 head is initialized from run.seed")


@dataclass
class WeightedTerm:
    """A baseline KD term of METHOD (E6): enabled when ``weight`` > 0."""

    weight: float = setting(0.0, "weight of the term (E6); 0 disables it", NON_NEGATIVE)


@dataclass
class L2Config(WeightedTerm):
    """Raw L2 feature distillation (METHOD E6)."""

    weight: float = setting(0.0, "weight of raw L2 feature distillation (E6)", NON_NEGATIVE)


@dataclass
class FCConfig(WeightedTerm):
    """Feature consistency ``1 - c_i`` (METHOD E6)."""

    weight: float = setting(0.0, "weight of feature consistency 1 - c_i (E6)", NON_NEGATIVE)


@dataclass
class RKDConfig:
    """Relational KD (METHOD E6): distance and angle terms."""

    weight: float = setting(0.0, "weight of relational KD (E6)", NON_NEGATIVE)
    distance_weight: float = setting(1.0, "RKD distance-term weight (E6)", NON_NEGATIVE)
    angle_weight: float = setting(2.0, "RKD angle-term weight (E6)", NON_NEGATIVE)


KD_TERMS = ("iled", "rpsd", "l2", "fc", "rkd")
"""The distillation terms of METHOD (E2, E4, E6), each a ``loss.<name>`` section with a weight."""


@dataclass
class BalanceConfig:
    """METHOD (E7): each enabled distillation term's weight set from its gradient norm."""

    enabled: bool = setting(False, "set the weight of every enabled distillation term so that "
                                   "its gradient norm on the student embeddings is the term's "
                                   "target ratio of SphereFace2's, on logging steps (E7); the "
                                   "configured weights are the starting values")
    iled: float = setting(0.0, "target ratio rho of ILED's gradient norm to SphereFace2's (E7)",
                          NON_NEGATIVE)
    rpsd: float = setting(0.0, "target ratio rho of RPSD's gradient norm to SphereFace2's (E7)",
                          NON_NEGATIVE)
    l2: float = setting(0.0, "target ratio rho of l2's gradient norm to SphereFace2's (E7)",
                        NON_NEGATIVE)
    fc: float = setting(0.0, "target ratio rho of fc's gradient norm to SphereFace2's (E7)",
                        NON_NEGATIVE)
    rkd: float = setting(0.0, "target ratio rho of rkd's gradient norm to SphereFace2's (E7)",
                         NON_NEGATIVE)
    smoothing: float = setting(0.5, "share beta of the new value in each update, in log space: "
                                    "log w <- (1 - beta) log w + beta log w* (E7)",
                               Rule(lambda v: 0 < v <= 1, "in (0, 1]"))
    min_weight: float = setting(1e-3, "lower bound of a balanced weight (E7)", POSITIVE)
    max_weight: float = setting(1e3, "upper bound of a balanced weight (E7)", POSITIVE)


@dataclass
class LossConfig:
    """The unified objective, METHOD (E5): a weighted sum of terms; weight 0 disables a term."""

    sphereface2: SphereFace2Config = field(default_factory=SphereFace2Config)
    iled: ILEDConfig = field(default_factory=ILEDConfig)
    rpsd: RPSDConfig = field(default_factory=RPSDConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    l2: L2Config = field(default_factory=L2Config)
    fc: FCConfig = field(default_factory=FCConfig)
    rkd: RKDConfig = field(default_factory=RKDConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)


@dataclass
class OptimConfig:
    """SGD and its learning rate (see ``fr_distill/engine/optim.py``)."""

    name: Literal["sgd"] = setting("sgd", "optimizer")
    lr: float = setting(0.1, "base learning rate: used as is when optim.reference_batch is 0, "
                             "else multiplied by (global batch x optim.accumulation_steps) / "
                             "optim.reference_batch", POSITIVE)
    momentum: float = setting(0.9, "SGD momentum", FRACTION)
    weight_decay: float = setting(5e-4, "weight decay", NON_NEGATIVE)
    no_decay_bn_bias: bool = setting(False, "no weight decay on BatchNorm parameters and biases")
    reference_batch: int = setting(0, "batch at which optim.lr holds: > 0 multiplies optim.lr by "
                                      "(global batch x optim.accumulation_steps) / "
                                      "reference_batch; 0 = no scaling", NON_NEGATIVE)
    grad_clip: float = setting(0.0, "maximum global gradient norm; 0 disables clipping",
                               NON_NEGATIVE)
    accumulation_steps: int = setting(1, "micro-steps per optimizer step (loss divided, schedule "
                                         "stepped per optimizer step)", POSITIVE)
    fused: bool = setting(True, "the fused SGD kernel where the device supports it")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, in optimizer steps."""

    name: Literal["multistep", "cosine", "poly"] = setting("multistep", "learning-rate schedule")
    total_steps: int = setting(80000, "optimizer steps of the run", POSITIVE)
    warmup_steps: int = setting(0, "linear warmup steps", NON_NEGATIVE)
    milestones: list[int] = setting([40000, 60000, 70000],
                                    "multistep: steps where lr is multiplied by gamma")
    gamma: float = setting(0.1, "multistep decay factor", POSITIVE)
    power: float = setting(2.0, "poly: exponent of the decay", POSITIVE)
    min_lr: float = setting(0.0, "cosine/poly: final learning rate", NON_NEGATIVE)


@dataclass
class PrecisionConfig:
    """Mixed precision of the forward passes."""

    amp: Literal["bf16", "fp16", "fp32", "off"] = setting(
        "bf16", "autocast dtype of teacher and student (losses always float32): bf16 (fp32 on GPUs "
                "without bf16), fp16 with a GradScaler, fp32, or off (read as fp32)",
        aliases={"off": "fp32"})


@dataclass
class CheckpointConfig:
    every_steps: int = setting(2000, "checkpoint period in optimizer steps (and one at the end)",
                               POSITIVE)
    keep_last: int = setting(3, "checkpoints kept", POSITIVE)
    resume: bool = setting(True, "resume from the newest valid checkpoint of run.output_dir")
    format: Literal["file", "dcp"] = setting(
        "file", "step checkpoints: file (one torch.save file, rank 0 gathers a class-sharded "
                "head) or dcp (a torch.distributed.checkpoint directory, each rank writes its "
                "own head rows); either format resumes")
    async_save: bool = setting(
        False, "checkpoint.format=dcp: write each step checkpoint in a background thread from "
               "a copy in host memory; it counts once committed at the next checkpoint or at "
               "the end (a crash before that leaves the previous one the newest valid)")


@dataclass
class EvalConfig:
    bin_sets: list[str] = setting([], ".bin verification sets evaluated during training")
    every_steps: int = setting(0, "evaluation period; 0 = only at the end", NON_NEGATIVE)
    batch_size: int = setting(128, "images per rank per evaluation batch", POSITIVE)
    best_metric: str = setting("", "metric that selects best.pt, e.g. synth_lfw/accuracy_mean; "
                                   "empty = none")


@dataclass
class LoggingConfig:
    every_steps: int = setting(50, "console/TensorBoard logging period", POSITIVE)
    tensorboard: bool = setting(True, "write TensorBoard scalars")
    progress_bar: Literal["auto", "always", "never"] = setting(
        "auto", "progress bar: auto (when stderr is a terminal), always, never")
    diagnostics: bool = setting(True, "on logging steps, each term's gradient norm and share on "
                                      "the student embeddings, and ILED/RPSD mining fractions "
                                      "(METHOD D1)")
    wandb: bool = setting(False, "also send the logged scalars (train/, diagnostics/, eval/, as "
                                 "TensorBoard gets them) and the resolved config to a Weights & "
                                 "Biases run (rank 0; the wandb extra); a resumed run continues "
                                 "it")
    wandb_project: str = setting("fr_distill", "Weights & Biases project of the run",
                                 WANDB_PROJECT)
    wandb_mode: Literal["online", "offline"] = setting(
        "online", "online (synced while training), or offline (written to run.output_dir/wandb "
                  "for a later wandb sync); the WANDB_MODE environment variable overrides it")


@dataclass
class DistributedConfig:
    backend: Literal["auto", "nccl", "gloo"] = setting(
        "auto", "process-group backend: auto (NCCL with CUDA, else gloo)")
    device: Literal["auto", "cuda", "cpu"] = setting(
        "auto", "auto (cuda:LOCAL_RANK when CUDA is available), cuda, cpu")
    timeout_s: float = setting(1800.0, "collective timeout in seconds", POSITIVE)


@dataclass
class RunConfig:
    output_dir: str = setting("runs/default", "run directory: resolved config, checkpoints, "
                                              "TensorBoard logs; a run resumes from it")
    seed: int = setting(0, "seed of the weights (student and SphereFace2 head), the sampler "
                           "(order, flips) and every other random draw but the bank update")
    max_nonfinite_steps: int = setting(5, "consecutive non-finite losses (steps skipped) before "
                                          "the run stops", POSITIVE)
    deterministic: bool = setting(False, "deterministic kernels (slower) instead of cuDNN "
                                         "autotuning")


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
# Views of the schema: leaf keys, rules, reference table
# --------------------------------------------------------------------------------------
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields_of(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _leaves(cls=Config, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """``(key, field, type)`` of every leaf key under ``cls``, in declaration order."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _leaves(hint, prefix + f.name + ".")
        else:
            yield prefix + f.name, f, hint


def _choices(hint: Any) -> tuple | None:
    """The allowed values of a ``Literal`` type, else None."""
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def _one_of(choices: tuple) -> Rule:
    return Rule(lambda v: v in choices, "one of " + ", ".join(choices))


def _rule_of(f: dataclasses.Field, hint: Any) -> Rule | None:
    """A key's rule: the one its field declares, or membership in its ``Literal`` choices."""
    choices = _choices(hint)
    return _one_of(choices) if choices else f.metadata["rule"]


def rules() -> dict[str, Rule]:
    """Every key that has a rule, with its rule (what :func:`validate` checks)."""
    return {key: rule for key, f, hint in _leaves() if (rule := _rule_of(f, hint))}


def _type_name(hint: Any) -> str:
    """``int``, ``float``, ``list``...; a ``Literal`` is named by the type of its choices, an
    optional value ``float or null``."""
    choices = _choices(hint)
    if choices:
        return type(choices[0]).__name__
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a)
                           for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint)).replace("typing.", "")


def schema_reference() -> list[tuple[str, str, Any, str, str]]:
    """``(key, type, default, rule, meaning)`` for every leaf key: the README's configuration table."""
    defaults = Config()
    rows = []
    for key, f, hint in _leaves():
        rule = _rule_of(f, hint)
        rows.append((key, _type_name(hint), get_key(defaults, key), rule.text if rule else "",
                     f.metadata["help"]))
    return rows


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
MAX_SHOWN = 120
"""The most characters of a value an error message shows (a bad value can be any size)."""


def _cut(text: str) -> str:
    """``text`` (a key from a file, a value's repr) cut to :data:`MAX_SHOWN` characters."""
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 3] + "..."


def _shown(value: Any) -> str:
    """``repr(value)`` for a message, cut to :data:`MAX_SHOWN` characters without building the
    whole of it (a long string, a huge or deeply nested list)."""
    return _cut(_REPR.repr(value))


def _unknown_key(key: str, cls, source: str) -> ConfigError:
    key = _cut(key)
    section, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, _fields_of(cls), n=3, cutoff=0.5)
    prefix = section + "." if section else ""
    hint = ("; did you mean " + " or ".join(prefix + c for c in close) + "?") if close else (
        "; valid keys: " + ", ".join(prefix + c for c in _fields_of(cls)))
    return ConfigError(f"{source}: unknown config key '{key}'{hint}")


_YAML_SWITCH = {False: "off", True: "on"}


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check/convert ``value`` to the annotated type ``hint``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        lists = [a for a in args if typing.get_origin(a) is list]
        if lists and isinstance(value, (list, tuple)):
            return _coerce(value, lists[0], key, source)
        try:
            return _coerce(value, args[0], key, source)
        except ConfigError:
            if len(args) == 1:
                raise
            raise ConfigError(f"{source}: config key '{key}' must be {_type_name(hint)}, "
                              f"got {_shown(value)}") from None
    if origin is Literal:
        rule = _one_of(typing.get_args(hint))
        if isinstance(value, bool) and rule.check(_YAML_SWITCH[value]):
            value = _YAML_SWITCH[value]  # YAML 1.1 reads an unquoted off/on as a bool
        if not rule.check(value):
            raise ConfigError(f"{source}: config key '{key}' must be {rule.text}, "
                              f"got {_shown(value)}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: config key '{key}' must be a list, "
                              f"got {_shown(value)}")
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    bad = ConfigError(f"{source}: config key '{key}' must be {getattr(hint, '__name__', hint)},"
                      f" got {_shown(value)}")
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
        return _finite_float(value, bad, key, source)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise bad


def _finite_float(value: Any, bad: ConfigError, key: str, source: str) -> float:
    """``value`` (a number, or a string such as ``1e-3``, which YAML 1.1 reads as a string) as a
    finite float: ``inf`` and ``nan`` are refused in every spelling (``.inf`` in YAML, ``inf``
    on the command line, a string), as is an integer too large for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise bad from None
    if not math.isfinite(number):
        raise ConfigError(f"{source}: config key '{key}' must be a finite number, "
                          f"got {_shown(value)}")
    return number


def _merge(node: Any, cls, data: dict, prefix: str, source: str) -> None:
    """Apply the mapping ``data`` onto the dataclass instance ``node`` (in place)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: config section '{prefix.rstrip('.') or '<root>'}' "
                          f"must be a mapping, got {_shown(data)}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in data.items():
        key = prefix + str(name)
        if name not in hints:
            raise _unknown_key(key, cls, source)
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            _merge(getattr(node, name), hint, value, key + ".", source)
        else:
            value = _coerce(value, hint, key, source)
            aliases = fields[name].metadata["aliases"]
            setattr(node, name, aliases.get(value, value) if aliases else value)


MAX_YAML_VALUES = 100_000
"""The most values (mapping keys and values, list items, scalars) a YAML document may expand
to once its aliases are resolved: a config holds a few hundred, and a document of a few
hundred bytes whose anchors alias each other ("billion laughs") expands to billions."""


def _expanded_size(root: yaml.Node) -> int:
    """How many values the node graph ``root`` stands for with every alias expanded, counted
    on the graph itself (each distinct node once); a node that contains itself counts as
    more than :data:`MAX_YAML_VALUES`."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            return MAX_YAML_VALUES + 1
        open_nodes.add(id(node))
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        sizes[id(node)] = 1 + sum(size(child) for child in children)
        open_nodes.discard(id(node))
        return sizes[id(node)]

    return size(root)


def load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)``, refusing (:class:`ConfigError` naming ``source``) a document
    whose aliases expand to more than :data:`MAX_YAML_VALUES` values, before it is built, and
    one nested too deeply for the parser; ``yaml.YAMLError`` for invalid YAML."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_YAML_VALUES:
            raise ConfigError(f"{source}: the YAML's aliases (*name) expand to more than "
                              f"{MAX_YAML_VALUES} values; a config never needs that many")
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{source}: the YAML is nested too deeply") from None
    finally:
        loader.dispose()


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """The mappings to merge for ``path``: its ``defaults:`` files first, then itself."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'defaults' include")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = load_yaml(path.read_text(), str(path)) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    bases = data.pop("defaults", []) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: 'defaults' must be a file name or a list of file names, "
                          f"got {_shown(bases)}")
    layers: list[tuple[dict, str]] = []
    for base in bases:
        layers += _read_yaml(path.parent / base, seen + (path,))
    layers.append((data, str(path)))
    return layers


def parse_override(text: str) -> tuple[str, Any]:
    """``'loss.rpsd.weight=20'`` → ``('loss.rpsd.weight', 20)`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{_cut(text)}' must look like key=value (e.g. "
                          f"loss.rpsd.weight=20)")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw, f"override {_cut(key.strip())}") if raw.strip() else ""
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
    for key, rule in rules().items():
        value = get_key(cfg, key)
        if not rule.check(value):
            raise ConfigError(f"config key '{key}' must be {rule.text}, got {_shown(value)}")
    if sorted(cfg.schedule.milestones) != list(cfg.schedule.milestones):
        raise ConfigError(f"config key 'schedule.milestones' must be increasing, "
                          f"got {_shown(cfg.schedule.milestones)}")
    if cfg.checkpoint.async_save and cfg.checkpoint.format != "dcp":
        raise ConfigError("config key 'checkpoint.async_save' needs checkpoint.format=dcp, got "
                          f"checkpoint.format={cfg.checkpoint.format!r}")
    _validate_balance(cfg.loss)
    if cfg.schedule.warmup_steps >= cfg.schedule.total_steps:
        raise ConfigError(f"config key 'schedule.warmup_steps' must be < schedule.total_steps "
                          f"({cfg.schedule.total_steps}), got {cfg.schedule.warmup_steps}")
    return cfg


def _validate_balance(loss: LossConfig) -> None:
    """``loss.balance`` (METHOD E7): a target for every enabled distillation term and for no
    other, bounds in order. Checked whether or not it is enabled, so a config that sets a
    target for a term that is off is refused rather than ignored."""
    balance = loss.balance
    if balance.min_weight >= balance.max_weight:
        raise ConfigError(f"config key 'loss.balance.min_weight' ({balance.min_weight:g}) must be "
                          f"< loss.balance.max_weight ({balance.max_weight:g})")
    for term in KD_TERMS:
        target, weight = getattr(balance, term), getattr(loss, term).weight
        if target > 0 and weight <= 0:
            raise ConfigError(f"config key 'loss.balance.{term}' sets a target ({target:g}) for "
                              f"a term that is off (loss.{term}.weight=0)")
        if balance.enabled and weight > 0 and target <= 0:
            raise ConfigError(f"config key 'loss.balance.{term}' must be > 0 with "
                              f"loss.balance.enabled and loss.{term}.weight > 0 (every enabled "
                              f"distillation term is balanced), got {target:g}")
    if balance.enabled and not any(getattr(loss, t).weight > 0 for t in KD_TERMS):
        raise ConfigError("config key 'loss.balance.enabled' is true but no distillation term is "
                          "enabled")
    if balance.enabled and loss.sphereface2.weight <= 0:
        raise ConfigError("config key 'loss.balance.enabled' needs SphereFace2 (the reference "
                          "gradient), but loss.sphereface2.weight is 0")


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


def check_paths(cfg: Config, cache_exists: bool = True, resuming: bool = False) -> None:
    """Fail before any model is built when an input the config names is missing.
    ``resuming``: the run resumes from a checkpoint, whose student it takes, so the
    ``model.init`` file is not read and need not exist (a requeued job whose scratch copy of
    it was cleaned up still resumes).

    Also refuses keys that need another one left empty: distillation terms or
    ``teacher.cache`` without a teacher, ``model.init_skip`` without ``model.init`` (a config
    may omit a path and receive it as an override, so this is checked here, not in
    :func:`validate`).
    """
    if not cfg.data.train:
        raise ConfigError("config key 'data.train' is empty: name an image folder or train.rec")
    if isinstance(cfg.data.train, str):
        wanted = [("data.train", cfg.data.train)]
    else:
        wanted = [(f"data.train[{i}]", p) for i, p in enumerate(cfg.data.train)]
        for key, p in wanted:
            if not p:
                raise ConfigError(f"config key '{key}' is empty: name an image folder or train.rec")
    kd_terms = [n for n in KD_TERMS if get_key(cfg, f"loss.{n}.weight") > 0]
    if kd_terms and not cfg.teacher.path:
        raise ConfigError(f"config key 'teacher.path' is empty but distillation terms "
                          f"{', '.join('loss.' + t for t in kd_terms)} have weight > 0")
    if cfg.model.init_skip and not cfg.model.init:
        raise ConfigError("config key 'model.init' is empty but model.init_skip is set: name the "
                          "weights file the student starts from")
    if cfg.teacher.cache and not cfg.teacher.path:
        raise ConfigError("config key 'teacher.path' is empty but teacher.cache is set: name the "
                          "teacher file the cache was built from (its sha256 is checked)")
    if cfg.teacher.path:
        wanted.append(("teacher.path", cfg.teacher.path))
    if cfg.model.init and not resuming:
        wanted.append(("model.init", cfg.model.init))
    wanted += [(f"eval.bin_sets[{i}]", p) for i, p in enumerate(cfg.eval.bin_sets)]
    wanted += [(f"teacher.check_sets[{i}]", p) for i, p in enumerate(cfg.teacher.check_sets)]
    if cfg.teacher.cache and cache_exists:  # cache-teacher creates it
        wanted.append(("teacher.cache", cfg.teacher.cache))
    for key, p in wanted:
        if not os.path.exists(p):
            raise ConfigError(f"config key '{key}': path not found: {p}")
    if cfg.teacher.cache:
        _check_cache_outside_images(cfg)


def train_source(train: str, fmt: str = "auto") -> tuple[str, Path, Path | None]:
    """(format, folder or .rec path, .idx path or None) that one ``data.train`` entry names
    under ``data.format``: a directory holding ``train.rec`` stands for that file unless the
    format is ``folder``. Nothing is checked here (the data package's ``resolve`` does)."""
    path = Path(train)
    if path.is_dir() and (path / "train.rec").is_file() and fmt != "folder":
        path = path / "train.rec"
    if fmt == "recordio" or (fmt == "auto" and path.is_file()):
        return "recordio", path, path.with_suffix(".idx")
    return "folder", path, None


def _check_cache_outside_images(cfg: Config) -> None:
    """Refuse ``teacher.cache`` inside an image folder of ``data.train``: every later scan of
    that folder would take the cache's directory for an identity and its files for images."""
    cache = Path(cfg.teacher.cache).resolve()
    train = [cfg.data.train] if isinstance(cfg.data.train, str) else cfg.data.train
    for entry in train:
        fmt, root, _ = train_source(entry, cfg.data.format)
        if fmt == "folder" and cache.is_relative_to(root.resolve()):
            raise ConfigError(f"config key 'teacher.cache': {cfg.teacher.cache} is inside the "
                              f"training image folder {entry} (data.train), where its files "
                              f"would be read as images: choose a directory outside it")


__all__ = ["Config", "ConfigError", "load_config", "validate", "check_paths", "save_config",
           "to_dict", "from_dict", "get_key", "parse_override", "rules", "schema_reference"]
