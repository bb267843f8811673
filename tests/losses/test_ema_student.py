"""The EMA student of ``ema_student_bank`` (METHOD E4): it follows the student, and its
embeddings fill the bank's student rows."""
from __future__ import annotations

import torch
import torch.nn as nn

from fr_distill.config import LossConfig
from fr_distill.losses import build_objective

C, D, B = 6, 8, 5


def test_ema_student_follows_the_student_and_fills_the_student_rows():
    """``ema_student_bank``: after each step θ_ema ← m·θ_ema + (1 − m)·θ, and the bank's
    student rows are the EMA student's normalized embeddings of the step's inputs."""
    cfg = LossConfig()
    cfg.iled.weight, cfg.rpsd.student_anchor, cfg.rpsd.ema_momentum = 0.0, "ema_student_bank", 0.75
    torch.manual_seed(0)
    student = nn.Linear(4, D)
    objective = build_objective(cfg, C, D, D, global_batch=B, student=student)
    start = student.weight.detach().clone()
    with torch.no_grad():
        student.weight.add_(1.0)  # an optimizer step
    x = torch.randn(B, 4)
    (ema_f_s,) = objective.ema_embeddings(student, [x])
    ema_weight = objective.ema_student.encoder.weight
    torch.testing.assert_close(ema_weight, 0.75 * start + 0.25 * (start + 1.0), rtol=0, atol=1e-6)
    assert not ema_weight.requires_grad and all(p is not ema_weight for p in objective.replicated_parameters())
    f_t = torch.randn(B, D)
    objective.update_bank(student(x).detach(), f_t, ema_f_s)
    torch.testing.assert_close(objective.bank.student[:B],
                               nn.functional.normalize(ema_f_s, dim=1), rtol=0, atol=0)
    assert any(k.startswith("ema_student.encoder.") for k in objective.state_dict())
