"""The teacher sanity check: the teacher measured before the first student step.

A wrong teacher (the wrong file, an ONNX graph fed the other input normalization, weights
that did not load as intended) still produces embeddings, and a student distilled from it
learns nothing useful for days. On a fresh start the teacher is evaluated (METHOD V1, images
sharded over the ranks) on ``teacher.check_sets``, or on ``eval.bin_sets`` when those are
not given; its accuracy on each set is logged and stored in the run's metrics. With
``teacher.min_accuracy`` > 0, a set below it stops the run with one line naming the set, the
accuracy and the teacher file.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from fr_distill.config import Config
from fr_distill.errors import FrDistillError
from fr_distill.eval import evaluate_bin_sets

log = logging.getLogger(__name__)


class TeacherCheckError(FrDistillError):
    """The teacher is below ``teacher.min_accuracy`` on a check set (bad input: exit 2)."""


def check_sets(cfg: Config) -> list[str]:
    """The sets the teacher is checked on: ``teacher.check_sets``, else ``eval.bin_sets``."""
    return list(cfg.teacher.check_sets or cfg.eval.bin_sets)


def check_teacher(teacher: nn.Module, cfg: Config, device: torch.device,
                  amp_dtype: torch.dtype | None) -> dict[str, float]:
    """The teacher's 10-fold accuracy on each check set (a collective); raises
    :class:`TeacherCheckError` below ``teacher.min_accuracy``."""
    results = evaluate_bin_sets(teacher, check_sets(cfg), device,
                                batch_size=cfg.eval.batch_size, amp_dtype=amp_dtype)
    accuracy = {name: metrics["accuracy_mean"] for name, metrics in results.items()}
    log.info("teacher check (%s): %s", cfg.teacher.path,
             ", ".join(f"{name} accuracy {value:.4f}" for name, value in accuracy.items()))
    floor = cfg.teacher.min_accuracy
    for name, value in accuracy.items():
        if floor > 0 and value < floor:
            raise TeacherCheckError(
                f"teacher {cfg.teacher.path} reaches {value:.4f} accuracy on {name}, below "
                f"teacher.min_accuracy={floor:g}: check the file, its architecture keys and, "
                f"for an ONNX graph, the input normalization it expects")
    return accuracy
