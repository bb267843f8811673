"""RPSD, Relation-Based Pairwise Similarity Distillation: METHOD (E4).

The student's similarities to the past samples in the memory bank are matched to the
teacher's, with a soft tolerance ``t``: relation pairs already within ``t`` are mined out.
The gradient flows through the current student embeddings only (the bank is detached).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fr_distill.losses.kd_inputs import KDInputs
from fr_distill.losses.memory_bank import MemoryBank

ANCHORS = ("student_bank", "teacher_bank", "ema_student_bank")


def rpsd_loss(student_hat: torch.Tensor, teacher_hat: torch.Tensor, student_anchor: torch.Tensor,
              teacher_anchor: torch.Tensor, r: float, t: float, b: float) -> torch.Tensor:
    """``mean_ij (1/r')·log(1 + exp(r'(|S^s_ij − S^t_ij| − t) + b'))`` of METHOD (E4).

    ``S^s = f̂^s · student_anchorᵀ``, ``S^t = f̂^t · teacher_anchorᵀ``; with no anchor rows the
    loss is exactly 0 (kept in the graph, so the total always has a gradient).
    """
    if teacher_anchor.shape[0] == 0:
        return (student_hat * 0.0).sum()
    relation_student = student_hat @ student_anchor.t()
    relation_teacher = teacher_hat @ teacher_anchor.t()
    gap = (relation_student - relation_teacher).abs()
    return (F.softplus(r * (gap - t) + b) / r).mean()


class RPSD(nn.Module):
    """METHOD (E4) against the filled rows of the shared :class:`MemoryBank` (E3).

    ``student_anchor``: ``student_bank`` compares the student with its own past embeddings
    ``M^s``; ``teacher_bank`` uses ``M^t`` for both relations (never stale);
    ``ema_student_bank`` compares it with ``M^s`` too, which the objective then fills from
    the EMA student (:mod:`fr_distill.losses.ema_student`).
    """

    def __init__(self, bank: MemoryBank, r: float = 60.0, t: float = 0.05, b: float = 1.0,
                 student_anchor: str = "student_bank") -> None:
        super().__init__()
        if student_anchor not in ANCHORS:
            raise ValueError(f"RPSD student_anchor must be one of {', '.join(ANCHORS)}, "
                             f"got {student_anchor!r}")
        self.bank = bank
        self.r, self.t, self.b = r, t, b
        self.student_anchor = student_anchor

    def extra_repr(self) -> str:
        return f"r={self.r} t={self.t} b={self.b} student_anchor={self.student_anchor}"

    def _anchors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(student anchor, teacher anchor)`` rows of the bank for S^s and S^t."""
        bank_teacher, bank_student = self.bank.filled_rows()
        anchor = bank_teacher if self.student_anchor == "teacher_bank" else bank_student
        return anchor, bank_teacher

    def forward(self, inputs: KDInputs) -> torch.Tensor:
        student_anchor, teacher_anchor = self._anchors()
        return rpsd_loss(inputs.student_hat, inputs.teacher_hat, student_anchor, teacher_anchor,
                         self.r, self.t, self.b)

    @torch.no_grad()
    def statistics(self, inputs: KDInputs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Mining statistics of METHOD D1 as ``(sum, count)`` on this rank: relation pairs
        whose gap ``|Δ_ij|`` is still above the tolerance ``t``, and the gaps themselves."""
        student_anchor, teacher_anchor = self._anchors()
        gap = (inputs.student_hat @ student_anchor.t() - inputs.teacher_hat @ teacher_anchor.t()).abs()
        pairs = torch.full((), float(gap.numel()), device=gap.device)
        return {"rpsd/above_tolerance": ((gap > self.t).float().sum(), pairs),
                "rpsd/mean_gap": (gap.sum(), pairs)}
