"""Export for deployment (``fr-distill export``): a student's files for serving, each verified.

:mod:`~fr_distill.deploy.artifacts` writes and loads the files (state dict, ONNX float32 and
float16, TorchScript), :mod:`~fr_distill.deploy.verify` checks each against the PyTorch model
(embeddings and 10-fold accuracy, METHOD V1), :mod:`~fr_distill.deploy.report` measures
parameters, GFLOPs and CPU latency, :mod:`~fr_distill.deploy.export` runs the export
(the command is :mod:`fr_distill.commands.export`).
"""
from __future__ import annotations

from .export import export_for_deployment

__all__ = ["export_for_deployment"]
