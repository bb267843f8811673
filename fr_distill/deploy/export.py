"""The export of a student for deployment (``fr-distill export``,
:mod:`fr_distill.commands.export`): its files, each verified, with a report.

Order of work: every input is checked first (formats and their packages, the output
directory, the checkpoint, the `.bin` sets, the numbers), so bad input costs nothing. Then the
files are written into a staging directory inside ``--out``, loaded back and verified
(:mod:`fr_distill.deploy.verify`); only when all of them pass are they moved into ``--out``,
``export.json`` written last and the table printed. A failed export removes the staging
directory, and ``--out`` itself when this export created it, so ``--out`` is left as it was.

``--out`` must be new, empty, or the directory of an earlier export: the files its
``export.json`` lists (and the report itself) are the only ones an export replaces or removes.
Any other file there (an InsightFace model folder holds its own ``backbone.onnx`` and
``backbone.pth``) is refused by name before any work.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fr_distill.errors import FrDistillError
from fr_distill.eval.runner import check_bin_sets
from fr_distill.models.export import ExportError, load_student
from fr_distill.models.registry import build_student
from fr_distill.models.weights import architecture
from fr_distill.paths import atomic_write, require_writable_dir
from fr_distill.study.report import machine_description
from fr_distill.synthetic.build import write_verification_bin

from . import report as costs
from .artifacts import FORMATS, STATE_DICT, WRITERS, Format, insightface_input, load_artifact
from .verify import DEFAULT_ACCURACY_TOLERANCE, embedding_bound, reference_sets, verify_artifact

logger = logging.getLogger("fr_distill")

REPORT = "export.json"
STAGING_PREFIX = ".export-staging-"
SYNTHETIC_SET = "synth_lfw.bin"


class ExportInputError(FrDistillError, ValueError):
    """A flag of ``fr-distill export`` cannot be used (one line, exit 2)."""


def installed_formats() -> list[str]:
    return [name for name, fmt in FORMATS.items() if not fmt.missing_packages()]


def parse_formats(text: str | None) -> list[Format]:
    """The formats of ``--formats`` (comma-separated); by default every format whose packages
    are installed. An unknown name or a named format with a package missing is refused."""
    names = installed_formats() if text is None else [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in FORMATS:
            raise ExportInputError(f"--formats: unknown format '{name}'; choose from "
                                   f"{', '.join(FORMATS)}")
        missing = FORMATS[name].missing_packages()
        if missing:
            raise ExportInputError(f"--formats: {name} needs the package(s) {', '.join(missing)} "
                                   "(pip install -e '.[onnx]')")
    return [STATE_DICT] + [fmt for name, fmt in FORMATS.items() if name in names]


def _positive_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ExportInputError(f"{flag}: '{text}' is not a comma-separated list of positive integers")
    return values


def _check_numbers(args: argparse.Namespace) -> None:
    for flag in ("synthetic_pairs", "threads", "latency_repeats", "batch_size"):
        if getattr(args, flag) < 1:
            raise ExportInputError(f"--{flag.replace('_', '-')} must be at least 1, got "
                                   f"{getattr(args, flag)}")
    if args.synthetic_pairs < 10:
        raise ExportInputError(f"--synthetic-pairs must be at least 10 (10 folds), got "
                               f"{args.synthetic_pairs}")
    if args.latency_warmup < 0:
        raise ExportInputError(f"--latency-warmup must be at least 0, got {args.latency_warmup}")
    for precision in DEFAULT_ACCURACY_TOLERANCE:
        value = getattr(args, f"tolerance_{precision}")
        if not value >= 0:
            raise ExportInputError(f"--tolerance-{precision} must be at least 0 points, got {value}")


def _write_and_verify(fmt: Format, model: torch.nn.Module, staging: Path, sets: list,
                      fresh_student, args: argparse.Namespace) -> dict:
    """Write ``fmt``'s file into ``staging``, load it back, verify it and time it."""
    path = staging / fmt.file
    logger.info("writing and verifying %s (%s)", fmt.file, fmt.name)
    try:
        WRITERS[fmt.name](model, path)
        module = load_artifact(fmt, path, fresh_student, args.threads)
    except FrDistillError:
        raise
    except Exception as err:  # exporters and runtimes raise their own exception types
        raise ExportError(f"{fmt.name} artifact {fmt.file}: cannot be written and loaded back: "
                          f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}") from None
    if fmt.runtime == "onnxruntime" and insightface_input(path) != (127.5, 127.5):
        raise ExportError(f"{fmt.name} artifact {fmt.file}: InsightFace's loader would feed it "
                          "raw 0-255 pixels (node names Sub* and Mul* among its first 8 nodes)")
    tolerance = getattr(args, f"tolerance_{fmt.precision}")
    results = verify_artifact(fmt, module, sets, tolerance, args.batch_size)
    logger.info("%s: verified (largest relative embedding error %.1e)", fmt.file,
                max(results["embedding_rel_error"].values()))
    latency = {str(batch): costs.latency_ms(module, batch, args.latency_warmup,
                                            args.latency_repeats)
               for batch in args.latency_batches}
    return {"format": fmt.name, "file": fmt.file, "precision": fmt.precision,
            "runtime": fmt.runtime, "bytes": path.stat().st_size, "verified": True,
            "embedding_bound": embedding_bound(fmt), "accuracy_tolerance_points": tolerance,
            **results, "latency_ms": latency}


def _earlier_export_files(out: Path) -> set[str]:
    """The files of ``out`` an earlier export wrote: its ``export.json`` and the deployment
    files that report lists (none when there is no readable report of ours)."""
    try:
        report = json.loads((out / REPORT).read_text())
        listed = {art["file"] for art in report["artifacts"]}
    except (OSError, ValueError, TypeError, KeyError):
        return set()
    return {REPORT} | (listed & {fmt.file for fmt in [STATE_DICT, *FORMATS.values()]})


def claim_out(out: Path) -> set[str]:
    """Check, before any work, that ``out`` is absent, empty or an earlier export's directory
    (see the module docstring), and return the earlier export's files this one may replace.
    :class:`ExportInputError` names the directory and its first file no export wrote."""
    if not os.path.isdir(out):
        return set()  # absent (created later), or a file: require_writable_dir names it
    owned = _earlier_export_files(out)
    try:
        entries = list(os.scandir(out))
    except OSError as err:
        raise ExportInputError(f"--out: cannot list {out} ({err.strerror or err})") from None
    foreign = sorted(entry.name for entry in entries
                     if not (entry.name in owned and not entry.is_dir(follow_symlinks=False))
                     and not entry.name.startswith(STAGING_PREFIX))
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise ExportInputError(f"--out: {out} holds {foreign[0]}{more}, which no earlier "
                               f"fr-distill export wrote there; export into a new or empty "
                               f"directory (or an earlier export's: its {REPORT} lists its files)")
    return owned


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` (itself included) that does not exist yet: what
    creating ``path`` creates, and a failed export removes."""
    missing = None
    for directory in [path, *path.parents]:
        if os.path.lexists(directory):
            return missing
        missing = directory
    return missing


def _remove_created(out: Path, created: Path | None) -> None:
    """Remove ``out`` and its parents up to ``created`` (the directories this export made),
    each only when empty."""
    if created is None:
        return
    for directory in [out, *out.parents]:
        try:
            directory.rmdir()
        except OSError:
            return
        if directory == created:
            return


def _publish(staging: Path, out: Path, artifacts: list[dict], report: dict,
             earlier: set[str]) -> None:
    """Move the verified files into ``out``, remove the files of the ``earlier`` export there
    that this one does not write, and write ``export.json`` last."""
    written = {art["file"] for art in artifacts}
    (out / REPORT).unlink(missing_ok=True)  # an earlier report must not describe these files
    for art in artifacts:
        os.replace(staging / art["file"], out / art["file"])
    for name in sorted(earlier - written - {REPORT}):
        (out / name).unlink(missing_ok=True)
    atomic_write(out / REPORT, (json.dumps(report, indent=2) + "\n").encode())


def export_for_deployment(args: argparse.Namespace) -> dict:
    """The whole export (see the module docstring); returns the report written to export.json."""
    formats = parse_formats(args.formats)
    args.latency_batches = _positive_ints(args.latency_batches, "--latency-batches")
    _check_numbers(args)
    out = Path(args.out)
    earlier = claim_out(out)
    created = _first_missing(out)
    try:
        require_writable_dir(out, "--out")
        return _export_into(out, earlier, args, formats)
    except BaseException:
        _remove_created(out, created)
        raise


def _export_into(out: Path, earlier: set[str], args: argparse.Namespace,
                 formats: list[Format]) -> dict:
    """The export once ``--out`` is claimed: the checkpoint and the sets checked, then every
    file written, verified and published (see the module docstring)."""
    if not Path(args.checkpoint).exists():
        raise ExportInputError(f"--checkpoint: no such file {args.checkpoint}")
    model, model_cfg, step = load_student(args.checkpoint)
    if args.bin:
        check_bin_sets(args.bin)
    torch.set_num_threads(args.threads)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    try:
        bins = args.bin or [str(write_verification_bin(staging / SYNTHETIC_SET,
                                                       args.synthetic_pairs))]
        sets = reference_sets(model, bins, args.batch_size)
        for vset in sets:
            logger.info("PyTorch model on %s (%d pairs): 10-fold accuracy %.3f %%", vset.name,
                        len(vset.issame), vset.accuracy)
        def fresh_student():
            return build_student(model_cfg.name, model_cfg.embedding_dim, model_cfg.width,
                                 model_cfg.dropout)

        artifacts = [_write_and_verify(fmt, model, staging, sets, fresh_student, args)
                     for fmt in formats]
        report = {
            "checkpoint": str(args.checkpoint), "step": step,
            "architecture": architecture(model_cfg),
            "parameters": costs.parameter_count(model),
            "gflops_per_image": costs.gflops_per_image(model),
            "flop_convention": costs.FLOP_CONVENTION,
            "machine": machine_description(),
            "latency": {"device": "cpu", "threads": args.threads, "batches": args.latency_batches,
                        "warmup": args.latency_warmup, "repeats": args.latency_repeats,
                        "statistic": "median ms per batch"},
            "verification_sets": [{"name": s.name, "path": None if not args.bin else s.path,
                                   "pairs": len(s.issame), "synthetic": not args.bin}
                                  for s in sets],
            "reference": {"runtime": "torch (eager), float32",
                          "accuracy": {s.name: s.accuracy for s in sets}},
            "artifacts": artifacts,
        }
        _publish(staging, out, artifacts, report, earlier)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report
