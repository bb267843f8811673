"""RPSD, METHOD (E4): zero on an empty bank, the b'-floor at student == teacher, value against
a float64 double loop for both anchor modes, gradcheck."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fr_distill.losses.kd_inputs import KDInputs
from fr_distill.losses.memory_bank import MemoryBank
from fr_distill.losses.rpsd import RPSD

STUDENT = torch.tensor([[0.9, 0.1, -0.2], [0.2, 1.1, 0.4], [-0.6, 0.3, 0.8]], dtype=torch.float64)
TEACHER = torch.tensor([[1.0, 0.0, 0.3], [0.1, 0.9, 0.6], [0.5, 0.2, 0.7]], dtype=torch.float64)
BANK_TEACHER = torch.tensor([[0.3, -0.8, 0.2], [0.6, 0.6, -0.1], [-0.2, 0.4, 0.9],
                             [0.7, -0.1, -0.5]], dtype=torch.float64)
BANK_STUDENT = torch.tensor([[0.4, -0.7, 0.1], [0.5, 0.8, 0.0], [-0.1, 0.5, 1.0],
                             [0.9, -0.3, -0.4]], dtype=torch.float64)


def kd_inputs(student: torch.Tensor, teacher: torch.Tensor) -> KDInputs:
    s_hat, t_hat = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    return KDInputs(student, teacher, s_hat, t_hat, (s_hat * t_hat).sum(dim=1))


def filled_bank(teacher_rows: torch.Tensor, student_rows: torch.Tensor,
                capacity: int = 6) -> MemoryBank:
    bank = MemoryBank(capacity, teacher_rows.shape[1]).double()
    bank.enqueue(F.normalize(teacher_rows, dim=1), F.normalize(student_rows, dim=1))
    return bank


def unit_rows(rows: torch.Tensor) -> list[list[float]]:
    return [[x / math.sqrt(sum(v * v for v in row)) for x in row] for row in rows.tolist()]


def literal_rpsd(student, teacher, bank_student, bank_teacher, r, t, b):
    """E4 pair by pair, in plain Python floats."""
    s_rows, t_rows = unit_rows(student), unit_rows(teacher)
    ms_rows, mt_rows = unit_rows(bank_student), unit_rows(bank_teacher)
    total = 0.0
    for s, tt in zip(s_rows, t_rows):
        for ms, mt in zip(ms_rows, mt_rows):
            gap = abs(sum(a * c for a, c in zip(s, ms)) - sum(a * c for a, c in zip(tt, mt)))
            total += math.log(1 + math.exp(r * (gap - t) + b)) / r
    return total / (len(s_rows) * len(ms_rows))


def test_empty_bank_gives_exactly_zero_and_a_zero_gradient():
    student = STUDENT.clone().requires_grad_()
    value = RPSD(MemoryBank(6, 3).double())(kd_inputs(student, TEACHER))
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("anchor", ["student_bank", "teacher_bank"])
def test_value_equals_the_formula(anchor):
    bank = filled_bank(BANK_TEACHER, BANK_STUDENT)
    value = RPSD(bank, 60.0, 0.05, 1.0, anchor)(kd_inputs(STUDENT, TEACHER))
    anchor_rows = BANK_STUDENT if anchor == "student_bank" else BANK_TEACHER
    expected = literal_rpsd(STUDENT, TEACHER, anchor_rows, BANK_TEACHER, 60.0, 0.05, 1.0)
    assert value.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("anchor", ["student_bank", "teacher_bank"])
def test_gradcheck(anchor):
    term = RPSD(filled_bank(BANK_TEACHER, BANK_STUDENT), 60.0, 0.05, 1.0, anchor)
    assert torch.autograd.gradcheck(lambda s: term(kd_inputs(s, TEACHER)),
                                    (STUDENT.clone().requires_grad_(),))


def test_student_equal_to_teacher_gives_only_the_bias_floor():
    bank = filled_bank(BANK_TEACHER, BANK_TEACHER)
    value = RPSD(bank, 60.0, 0.05, 1.0)(kd_inputs(TEACHER, TEACHER))
    floor = math.log(1 + math.exp(-60.0 * 0.05 + 1.0)) / 60.0
    assert value.item() == pytest.approx(floor, rel=1e-12)


def test_only_filled_rows_are_used():
    bank = filled_bank(BANK_TEACHER[:2], BANK_STUDENT[:2], capacity=6)
    value = RPSD(bank)(kd_inputs(STUDENT, TEACHER))
    expected = literal_rpsd(STUDENT, TEACHER, BANK_STUDENT[:2], BANK_TEACHER[:2], 60.0, 0.05, 1.0)
    assert value.item() == pytest.approx(expected, rel=1e-12)
