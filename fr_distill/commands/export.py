"""``fr-distill export`` and ``tools/export.py``: a student's verified deployment files and
their report (:mod:`fr_distill.deploy.export`)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from fr_distill.deploy import report as costs
from fr_distill.deploy.artifacts import FORMATS
from fr_distill.deploy.export import REPORT, export_for_deployment, logger
from fr_distill.deploy.verify import DEFAULT_ACCURACY_TOLERANCE
from fr_distill.errors import FrDistillError, exit_with


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fr-distill export",
        description="Write a student's deployment files (backbone.pth and ONNX float32/float16, "
                    "TorchScript), verify each against the PyTorch model (embeddings and 10-fold "
                    "accuracy on .bin sets), and report size, GFLOPs and CPU latency (export.json).")
    parser.add_argument("--checkpoint", required=True,
                        help="fr_distill checkpoint (step_*.pt, a step_* directory of "
                             "checkpoint.format=dcp, or best.pt)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--formats", default=None,
                        help=f"comma-separated, from {', '.join(FORMATS)} (default: every format "
                             "whose packages are installed); backbone.pth is always written")
    parser.add_argument("--bin", action="append", default=[], metavar="PATH",
                        help="verification .bin set (repeatable; default: a synthetic synth_lfw "
                             "set of --synthetic-pairs pairs)")
    parser.add_argument("--synthetic-pairs", type=int, default=600,
                        help="pairs of the synthetic set used without --bin (default 600)")
    for precision, default in DEFAULT_ACCURACY_TOLERANCE.items():
        parser.add_argument(f"--tolerance-{precision}", type=float, default=default,
                            help=f"largest accuracy difference of a {precision} file to the "
                                 f"PyTorch model, in points (default {default:g})")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads for torch and onnxruntime (default: torch's, "
                             f"{torch.get_num_threads()} here)")
    parser.add_argument("--latency-batches", default="1,64", help="batch sizes timed (default 1,64)")
    parser.add_argument("--latency-warmup", type=int, default=3, help="untimed runs (default 3)")
    parser.add_argument("--latency-repeats", type=int, default=20,
                        help="timed runs, the median is reported (default 20)")
    parser.add_argument("--batch-size", type=int, default=64, help="verification batch size")
    return parser


def export_main(argv: list[str] | None = None) -> int:
    """``fr-distill export`` (and ``tools/export.py``): exit 0 when every file is verified,
    2 for bad input, 1 when a file fails its verification."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s")  # other libraries' loggers: warnings only
    logger.setLevel(logging.INFO)
    try:
        report = export_for_deployment(args)
    except FrDistillError as err:
        return exit_with(err)
    print(costs.format_table(report))
    print(f"wrote {Path(args.out) / REPORT}")
    return 0
