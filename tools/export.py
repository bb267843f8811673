"""Export a trained student for deployment: the same as ``fr-distill export``.

    python tools/export.py --checkpoint runs/x/checkpoints/best.pt --out exported/

Writes ``backbone.pth`` (InsightFace-layout state dict), ``backbone.onnx``,
``backbone_fp16.onnx`` and ``backbone_torchscript.pt``, each verified against the PyTorch model,
and ``export.json`` (see ``--help`` and README, "Teachers and exporting the student").
"""
from __future__ import annotations

import sys

from fr_distill.commands.export import export_main

if __name__ == "__main__":
    sys.exit(export_main())
