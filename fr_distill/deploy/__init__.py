"""Export for deployment (``fr-distill export``): a student's files for serving, each verified.

:mod:`~fr_distill.deploy.artifacts` writes and loads the files (state dict, ONNX float32 and
float16, TorchScript), :mod:`~fr_distill.deploy.verify` checks each against the PyTorch model
(embeddings and 10-fold accuracy, METHOD V1), :mod:`~fr_distill.deploy.report` measures
parameters, GFLOPs and CPU latency, :mod:`~fr_distill.deploy.command` is the command.
"""
from __future__ import annotations

from .command import export_for_deployment, export_main

__all__ = ["export_for_deployment", "export_main"]
