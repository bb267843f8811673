#!/usr/bin/env python3
"""The end-to-end demo on synthetic faces (``make demo``): data, teacher, four students under
torchrun (none, ILED, RPSD, unified), evaluation with 95 % intervals, ``study.md``."""
from __future__ import annotations

import argparse
import sys

from fr_distill.demo import run_demo
from fr_distill.study import StudyError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out", help="output directory (reused by a second run)")
    parser.add_argument("--quick", action="store_true",
                        help="small data set and a few steps per model (the form CI runs)")
    parser.add_argument("--nproc", type=int, default=2, help="processes per training run")
    args = parser.parse_args()
    try:
        run_demo(args.out, quick=args.quick, nproc=args.nproc)
    except StudyError as err:
        print(f"demo: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
