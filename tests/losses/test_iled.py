"""ILED, METHOD (E2): value against a float64 evaluation written out in the test, gradcheck,
hard-sample gradient ordering, the ω ≡ 1 guard and the near-zero floor at student == teacher."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fr_distill.losses.iled import ILED, distance_weights, iled_per_sample
from fr_distill.losses.kd_inputs import KDInputs

STUDENT = torch.tensor([[0.9, 0.1, -0.2, 0.3],
                        [0.2, 1.1, 0.4, -0.5],
                        [-0.6, 0.3, 0.8, 0.1]], dtype=torch.float64)
TEACHER = torch.tensor([[1.0, 0.0, 0.0, 0.2],
                        [0.1, 0.9, 0.6, -0.4],
                        [0.5, 0.2, 0.7, -0.3]], dtype=torch.float64)


def kd_inputs(student: torch.Tensor, teacher: torch.Tensor) -> KDInputs:
    s_hat, t_hat = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    return KDInputs(student, teacher, s_hat, t_hat, (s_hat * t_hat).sum(dim=1))


def literal_iled(student, teacher, r, s, b, weighting):
    """E2 sample by sample, in plain Python floats."""
    cosines = []
    for u, v in zip(student.tolist(), teacher.tolist()):
        dot = sum(a * c for a, c in zip(u, v))
        cosines.append(dot / math.sqrt(sum(a * a for a in u) * sum(c * c for c in v)))
    mean_distance = sum(1 - c for c in cosines) / len(cosines)
    total = 0.0
    for c in cosines:
        omega = (1 - c) / mean_distance if weighting else 1.0
        total += omega * math.log(1 + math.exp(r * (s - c) + b)) / r
    return total / len(cosines)


@pytest.mark.parametrize("weighting", [True, False])
def test_value_equals_the_formula(weighting):
    value = ILED(40.0, 0.9, 0.1, weighting)(kd_inputs(STUDENT, TEACHER))
    expected = literal_iled(STUDENT, TEACHER, 40.0, 0.9, 0.1, weighting)
    assert value.item() == pytest.approx(expected, rel=1e-12)


def test_gradcheck():
    # Without distance weighting the loss is a plain function of the student embeddings.
    term = ILED(40.0, 0.9, 0.1, distance_weighting=False)
    assert torch.autograd.gradcheck(lambda s: term(kd_inputs(s, TEACHER)),
                                    (STUDENT.clone().requires_grad_(),))
    # With it, ω is a stop-gradient constant of the step: check with ω frozen.
    omega = distance_weights(kd_inputs(STUDENT, TEACHER).cosine)

    def weighted(s):
        return (omega * iled_per_sample(kd_inputs(s, TEACHER).cosine, 40.0, 0.9, 0.1)).mean()

    assert torch.autograd.gradcheck(weighted, (STUDENT.clone().requires_grad_(),))
    student = STUDENT.clone().requires_grad_()
    ILED()(kd_inputs(student, TEACHER)).backward()
    frozen = STUDENT.clone().requires_grad_()
    weighted(frozen).backward()
    torch.testing.assert_close(student.grad, frozen.grad, rtol=1e-12, atol=1e-15)


def unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle), 0.0]


@pytest.mark.parametrize("weighting", [True, False])
def test_far_sample_gets_a_larger_gradient_than_one_above_s(weighting):
    teacher = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    # cosines 0.5 (hard) and 0.95 (> s = 0.9, easy)
    student = torch.tensor([unit(math.acos(0.5)), unit(math.acos(0.95))], dtype=torch.float64,
                           requires_grad=True)
    ILED(40.0, 0.9, 0.1, weighting)(kd_inputs(student, teacher)).backward()
    hard, easy = student.grad.norm(dim=1).tolist()
    assert hard > easy > 0
    assert hard > 10 * easy


def test_student_equal_to_teacher_gives_the_floor_without_nan():
    student = TEACHER.clone().requires_grad_()
    value = ILED(40.0, 0.9, 0.1)(kd_inputs(student, TEACHER))
    value.backward()
    floor = math.log(1 + math.exp(40.0 * (0.9 - 1.0) + 0.1)) / 40.0
    assert value.item() == pytest.approx(floor, rel=1e-9)
    assert value.item() < 1e-3
    assert torch.isfinite(student.grad).all()
