"""``fr-distill study`` and ``tools/study.py``: run a study spec (:mod:`fr_distill.study`),
check it and list its runs (``--dry-run``), or write the report of the runs already finished
(``--report-only``)."""
from __future__ import annotations

import argparse

from fr_distill import study
from fr_distill.errors import FrDistillError, exit_with
from fr_distill.study.runner import run_study
from fr_distill.study.spec import load_spec


def study_main(argv: list[str] | None = None) -> int:
    """``fr-distill study SPEC [--out DIR] [--dry-run | --report-only]``."""
    parser = argparse.ArgumentParser(prog="fr-distill study", description=study.__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="study spec (YAML), e.g. configs/study/study.yaml")
    parser.add_argument("--out", default="study_out",
                        help="output directory; running again reuses and continues what is there")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the spec and list the runs, train nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the runs already finished, train nothing")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
        if args.dry_run:
            runs = (["teacher"] if spec.teacher_config else []) + [
                f"{v}/seed{s}" for s in spec.seeds for v in spec.variants]
            print(f"{spec.path}: OK, {len(runs)} runs: {', '.join(runs)}")
            return 0
        run_study(spec, args.out, train=not args.report_only)
    except FrDistillError as err:
        return exit_with(err)
    return 0
