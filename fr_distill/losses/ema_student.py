"""The momentum (EMA) student that fills the student bank for ``ema_student_bank``: METHOD (E4).

With ``loss.rpsd.student_anchor=ema_student_bank`` the student rows of the memory bank (E3)
are the embeddings of an exponential moving average of the student, as CompRess fills its
student queue from a momentum encoder: after each optimizer step
``θ_ema ← m·θ_ema + (1 − m)·θ`` (parameters; buffers are copied), then the step's images go
through the EMA student (no gradient, in the student's mode: BatchNorm uses the batch's
statistics, or its running ones with ``model.freeze_bn``) and its normalized embeddings are enqueued.

The copy starts as the student at build time (identical on every rank) and follows only
the student's synchronized parameters, so it stays identical on every rank; it is part of
the objective's checkpoint state. It is not optimized (its parameters are not handed to the
optimizer and need no gradient).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMAStudent(nn.Module):
    """An EMA copy of ``student`` with momentum ``momentum`` (METHOD E4, ``ema_student_bank``)."""

    def __init__(self, student: nn.Module, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.encoder = copy.deepcopy(student)
        self.encoder.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"

    @torch.no_grad()
    def follow(self, student: nn.Module) -> None:
        """One EMA update towards ``student`` (the bare model, after its optimizer step)."""
        ema_params = list(self.encoder.parameters())
        params = [p.detach() for p in student.parameters()]
        torch._foreach_mul_(ema_params, self.momentum)
        torch._foreach_add_(ema_params, params, alpha=1.0 - self.momentum)
        for ema_buffer, buffer in zip(self.encoder.buffers(), student.buffers()):
            ema_buffer.copy_(buffer)
        for ema_module, module in zip(self.encoder.modules(), student.modules()):
            ema_module.training = module.training  # e.g. BatchNorm frozen by model.freeze_bn

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)
