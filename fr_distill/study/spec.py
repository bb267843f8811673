"""The study spec: one teacher, one data set, variants (config overlays) × seeds.

A spec is a YAML file (``configs/study/study.yaml``)::

    data:                      # a synthetic data set, generated (and reused) in OUT/data ...
      synthetic: {identities: 200, images_per_identity: 24, bin_pairs: 3000, ...}
    # data: {train: DIR, bin_sets: [a.bin, ...], ijb_sets: [{root: DIR, name: IJBC}]}  # ... or yours
    #   (train: a folder or train.rec, or a list of them: [DIR_A, DIR_B/train.rec])
    teacher: {config: teacher.yaml}     # trained once by the study, or {path: FILE}
    student: student.yaml               # the config every variant overlays
    variants:                           # name -> dotted overrides of the student config
      none: []
      iled: [loss.iled.weight=1.0]
    baseline: none                      # differences are reported against this variant
    seeds: [1, 2, 3]                    # run.seed of each repetition (init and data order)
    nproc: 2                            # torchrun processes per training run
    bootstrap: 2000                     # bootstrap replicates of the 95 % intervals
    teacher_cache: true                 # the students read the teacher's rows from a cache
                                        # (fr-distill cache-teacher, built once, float32:
                                        # bitwise the teacher run on the fly) instead of
                                        # running the teacher every step

Paths are relative to the spec file. :func:`load_spec` checks everything a study will need
before any training starts — unknown keys, every variant's resolved config, the teacher, the
seeds — and raises :class:`StudyError` with a one-line message.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fr_distill.config import Config, ConfigError, load_config, load_yaml
from fr_distill.errors import FrDistillError

SYNTHETIC_KEYS = {"identities": "num_identities", "images_per_identity": "images_per_identity",
                  "seed": "seed", "family_size": "family_size", "bin_identities": "bin_identities",
                  "bin_pairs": "bin_pairs", "ijb_name": "ijb_name", "ijb_subjects": "ijb_subjects"}
"""Keys of ``data.synthetic`` → arguments of :func:`fr_distill.synthetic.generate`."""

TOP_KEYS = ("data", "teacher", "student", "variants", "baseline", "seeds", "nproc", "bootstrap",
            "teacher_cache")
DATA_KEYS = ("synthetic", "train", "bin_sets", "ijb_sets")
TEACHER_KEYS = ("config", "path")


class StudyError(FrDistillError, ValueError):
    """A study problem; the message is one line naming the spec key, variant or file."""


@dataclass(frozen=True)
class IJBSet:
    root: str
    name: str


@dataclass
class StudySpec:
    """A loaded, checked spec (paths absolute)."""

    path: Path
    student_config: Path
    variants: dict[str, list[str]]
    baseline: str
    seeds: list[int]
    teacher_config: Path | None = None
    teacher_path: Path | None = None
    synthetic: dict | None = None        # generate() arguments, or None for user data
    train: str | list[str] | None = None   # one training set, or a list of several
    bin_sets: list[str] = field(default_factory=list)
    ijb_sets: list[IJBSet] = field(default_factory=list)
    nproc: int = 2
    bootstrap: int = 2000
    teacher_cache: bool = False


def _unknown(keys, allowed, where: str, spec: Path) -> None:
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise StudyError(f"{spec}: unknown key '{where}{key}'{hint}; allowed: "
                             f"{', '.join(allowed)}")


def _mapping(value, where: str, spec: Path) -> dict:
    if not isinstance(value, dict):
        raise StudyError(f"{spec}: '{where}' must be a mapping, got {value!r}")
    return value


def _file(base: Path, value, where: str, spec: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise StudyError(f"{spec}: '{where}' must be a path, got {value!r}")
    path = (base / os.path.expanduser(value)).resolve()
    if not path.is_file():
        raise StudyError(f"{spec}: '{where}' file not found: {path}")
    return path


def _parse_data(raw: dict, base: Path, spec: Path) -> dict:
    _unknown(raw, DATA_KEYS, "data.", spec)
    if ("synthetic" in raw) == ("train" in raw):
        raise StudyError(f"{spec}: 'data' needs exactly one of 'synthetic' (generated) or "
                         f"'train' (your own training set)")
    if "synthetic" in raw:
        synthetic = _mapping(raw["synthetic"], "data.synthetic", spec)
        _unknown(synthetic, list(SYNTHETIC_KEYS), "data.synthetic.", spec)
        if set(raw) - {"synthetic"}:
            raise StudyError(f"{spec}: 'data.synthetic' makes its own evaluation sets; remove "
                             f"{', '.join(sorted(set(raw) - {'synthetic'}))}")
        return {"synthetic": {SYNTHETIC_KEYS[k]: v for k, v in synthetic.items()}}
    entries = raw["train"] if isinstance(raw["train"], list) else [raw["train"]]
    if not entries:
        raise StudyError(f"{spec}: 'data.train' is an empty list: name one or more training sets")
    paths = [str((base / str(entry)).resolve()) for entry in entries]
    for i, path in enumerate(paths):
        if not os.path.exists(path):
            where = f"data.train[{i}]" if isinstance(raw["train"], list) else "data.train"
            raise StudyError(f"{spec}: '{where}' not found: {path}")
    train = paths if isinstance(raw["train"], list) else paths[0]
    bins = [str(_file(base, b, "data.bin_sets", spec)) for b in raw.get("bin_sets") or []]
    ijb = []
    for entry in raw.get("ijb_sets") or []:
        entry = _mapping(entry, "data.ijb_sets[]", spec)
        _unknown(entry, ["root", "name"], "data.ijb_sets[].", spec)
        root = (base / str(entry.get("root", ""))).resolve()
        if not root.is_dir():
            raise StudyError(f"{spec}: 'data.ijb_sets' root not found: {root}")
        ijb.append(IJBSet(str(root), str(entry.get("name", ""))))
    if not bins and not ijb:
        raise StudyError(f"{spec}: 'data' names no evaluation set (bin_sets or ijb_sets)")
    return {"train": train, "bin_sets": bins, "ijb_sets": ijb}


def _parse_seeds(raw, spec: Path) -> list[int]:
    if not isinstance(raw, list) or not raw or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in raw):
        raise StudyError(f"{spec}: 'seeds' must be a non-empty list of integers, got {raw!r}")
    repeated = sorted({s for s in raw if raw.count(s) > 1})
    if repeated:
        raise StudyError(f"{spec}: 'seeds' lists {', '.join(map(str, repeated))} more than once")
    return list(raw)


def _parse_variants(raw, spec: Path) -> dict[str, list[str]]:
    variants = _mapping(raw, "variants", spec)
    if not variants:
        raise StudyError(f"{spec}: 'variants' is empty")
    parsed = {}
    for name, overrides in variants.items():
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise StudyError(f"{spec}: variant name {name!r} must be letters, digits, '_' or '-'")
        overrides = overrides or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o
                                                       for o in overrides):
            raise StudyError(f"{spec}: variant '{name}' must be a list of key=value overrides, "
                             f"got {overrides!r}")
        parsed[name] = list(overrides)
    return parsed


def load_spec(path: str | os.PathLike) -> StudySpec:
    """Read and check the spec at ``path`` (see the module docstring); no training starts."""
    spec_path = Path(path).resolve()
    if not spec_path.is_file():
        raise StudyError(f"study spec not found: {spec_path}")
    try:
        raw = load_yaml(spec_path.read_text(), str(spec_path)) or {}
    except yaml.YAMLError as err:
        raise StudyError(f"{spec_path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except ConfigError as err:  # an alias bomb
        raise StudyError(str(err)) from None
    raw = _mapping(raw, "(top level)", spec_path)
    _unknown(raw, TOP_KEYS, "", spec_path)
    for key in ("data", "teacher", "student", "variants", "seeds"):
        if key not in raw:
            raise StudyError(f"{spec_path}: missing key '{key}'")
    base = spec_path.parent
    data = _parse_data(_mapping(raw["data"], "data", spec_path), base, spec_path)
    teacher = _mapping(raw["teacher"], "teacher", spec_path)
    _unknown(teacher, TEACHER_KEYS, "teacher.", spec_path)
    if len(teacher) != 1:
        raise StudyError(f"{spec_path}: 'teacher' needs exactly one of 'config' (train it) or "
                         f"'path' (an existing teacher file)")
    variants = _parse_variants(raw["variants"], spec_path)
    baseline = raw.get("baseline", next(iter(variants)))
    if baseline not in variants:
        raise StudyError(f"{spec_path}: 'baseline' {baseline!r} is not a variant "
                         f"({', '.join(variants)})")
    nproc, bootstrap = raw.get("nproc", 2), raw.get("bootstrap", 2000)
    for key, value, low in (("nproc", nproc, 1), ("bootstrap", bootstrap, 100)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise StudyError(f"{spec_path}: '{key}' must be an integer >= {low}, got {value!r}")
    teacher_cache = raw.get("teacher_cache", False)
    if not isinstance(teacher_cache, bool):
        raise StudyError(f"{spec_path}: 'teacher_cache' must be true or false, got "
                         f"{teacher_cache!r}")
    spec = StudySpec(
        path=spec_path, student_config=_file(base, raw["student"], "student", spec_path),
        variants=variants, baseline=baseline, seeds=_parse_seeds(raw["seeds"], spec_path),
        teacher_config=_file(base, teacher["config"], "teacher.config", spec_path)
        if "config" in teacher else None,
        teacher_path=_file(base, teacher["path"], "teacher.path", spec_path)
        if "path" in teacher else None,
        nproc=nproc, bootstrap=bootstrap, teacher_cache=teacher_cache, **data)
    check_configs(spec)
    return spec


def check_configs(spec: StudySpec) -> None:
    """Resolve the teacher's and every variant's config (with placeholder paths), so that a
    bad key or value in any of them stops the study before its first run."""
    try:
        if spec.teacher_config is not None:
            load_config(spec.teacher_config, [])
        for name, overrides in spec.variants.items():
            try:
                student_config(spec, name, spec.seeds[0], overrides=[])
            except ConfigError as err:
                raise StudyError(f"{spec.path}: variant '{name}': {err}") from None
    except ConfigError as err:
        raise StudyError(f"{spec.path}: {err}") from None


def student_config(spec: StudySpec, variant: str, seed: int, overrides: list[str]) -> Config:
    """The resolved config of one student run (``overrides`` last: paths the runner sets)."""
    return load_config(spec.student_config,
                       [*spec.variants[variant], f"run.seed={seed}", *overrides])
