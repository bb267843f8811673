#!/usr/bin/env python3
"""The end-to-end demo on synthetic faces (``make demo``): data, teacher, four students under
torchrun (none, ILED, RPSD, unified), evaluation, results table and markdown report."""
from __future__ import annotations

import argparse

from fr_distill.demo import run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out", help="output directory (reused by a second run)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny data set and a few steps per model (the form CI runs)")
    parser.add_argument("--nproc", type=int, default=2, help="processes per training run")
    args = parser.parse_args()
    run_demo(args.out, quick=args.quick, nproc=args.nproc)


if __name__ == "__main__":
    main()
