"""``make demo``: the whole distillation workflow on synthetic faces, on CPUs, as a small study.

The demo is the study of ``configs/demo/study.yaml`` (:mod:`fr_distill.study`): it generates the
synthetic data set, trains the teacher (a deeper, wider IResNet, SphereFace2 only), trains
four students from the same initialization under ``torchrun --nproc_per_node 2`` (no
distillation, ILED, RPSD, the unified objective), evaluates every model on held-out
verification pairs and the IJB-style set, and writes ``study.md`` with each result's 95 %
interval and each student's paired difference to the student trained without distillation.
Everything finished is reused by a second run.

``quick=True`` runs ``configs/demo/quick/study.yaml``: a smaller data set and a few steps per
model, the form the tests run.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from fr_distill.errors import FrDistillError, exit_with
from fr_distill.resources import configs_dir
from fr_distill.study import StudyError, load_spec
from fr_distill.study.runner import run_study, say


def demo_spec(quick: bool = False) -> Path:
    """The study spec of the demo (full or quick form), from the shipped configs."""
    demo = configs_dir() / "demo"
    return demo / "quick" / "study.yaml" if quick else demo / "study.yaml"


def run_demo(out_dir: str | os.PathLike = "demo_out", quick: bool = False, nproc: int = 2) -> Path:
    """Run (or continue) the demo into ``out_dir``; print its tables; return ``study.md``."""
    spec = load_spec(demo_spec(quick))
    spec.nproc = nproc
    failed = [run for run in run_study(spec, out_dir)["runs"] if run["status"] == "failed"]
    if failed:
        raise StudyError(f"{failed[0]['name']} failed ({failed[0]['error']}); see "
                         f"{failed[0]['log']}; run `make demo` again to resume")
    report = Path(out_dir).resolve() / "study.md"
    tables = [line for line in report.read_text().splitlines() if line.startswith(("|", "## "))]
    print("\n" + "\n".join(line for line in tables if not line.startswith("## Fig")) + "\n")
    say(f"report: {report}")
    return report


def demo_main(argv: list[str] | None = None) -> int:
    """``fr-distill demo [--out DIR] [--quick] [--nproc N] [--dry-run]`` (``make demo``)."""
    parser = argparse.ArgumentParser(prog="fr-distill demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="output directory (reused by a second run)")
    parser.add_argument("--quick", action="store_true",
                        help="small data set and a few steps per model (the form CI runs)")
    parser.add_argument("--nproc", type=int, default=2, help="processes per training run")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the demo's spec and list its runs, train nothing")
    args = parser.parse_args(argv)
    try:
        if args.dry_run:
            spec = load_spec(demo_spec(args.quick))
            print(f"{spec.path}: OK, runs: teacher, "
                  + ", ".join(f"{v}/seed{s}" for s in spec.seeds for v in spec.variants))
            return 0
        run_demo(args.out, quick=args.quick, nproc=args.nproc)
    except FrDistillError as err:
        return exit_with(err, prefix="demo")
    return 0
