"""Export a trained student from an fr_distill checkpoint for deployment.

    python tools/export.py --checkpoint runs/x/checkpoints/step_80000.pt --out export/ [--onnx]

Writes ``backbone.pth`` (InsightFace-compatible state dict, loads with ``strict=True`` into
an InsightFace IResNet/MobileFaceNet of the same size) and, with ``--onnx``, ``backbone.onnx``
(dynamic batch, verified against the torch model with onnxruntime).
"""
from __future__ import annotations

import argparse
import logging
import sys

from fr_distill.errors import FrDistillError, exit_with
from fr_distill.models.export import export_student


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="fr_distill checkpoint file")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--onnx", action="store_true", help="also write a verified backbone.onnx")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        written = export_student(args.checkpoint, args.out, onnx=args.onnx)
    except FrDistillError as err:
        return exit_with(err)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
