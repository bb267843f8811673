"""The student/teacher embeddings every distillation term reads, prepared once per step."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KDInputs:
    """Embeddings of this rank's mini-batch, float32.

    ``student`` is the (projected) student embedding with gradient, ``teacher`` the teacher's;
    ``student_hat``/``teacher_hat`` are their L2-normalized forms (METHOD §1 ``x̂``) and
    ``cosine`` the per-sample student–teacher cosine ``c_i``.
    """

    student: torch.Tensor
    teacher: torch.Tensor
    student_hat: torch.Tensor
    teacher_hat: torch.Tensor
    cosine: torch.Tensor
