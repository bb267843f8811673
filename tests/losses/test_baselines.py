"""Baseline KD terms, METHOD (E6): l2, fc and RKD against float64 references written in the
test (RKD in Park et al.'s explicit difference-vector form), and gradcheck."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fr_distill.losses.baselines import FeatureConsistency, L2Distillation, RelationalKD
from fr_distill.losses.kd_inputs import KDInputs

STUDENT = torch.tensor([[0.9, 0.1, -0.2, 0.3],
                        [0.2, 1.1, 0.4, -0.5],
                        [-0.6, 0.3, 0.8, 0.1],
                        [0.4, -0.9, 0.2, 0.7]], dtype=torch.float64)
TEACHER = torch.tensor([[1.0, 0.0, 0.0, 0.2],
                        [0.1, 0.9, 0.6, -0.4],
                        [0.5, 0.2, 0.7, -0.3],
                        [0.3, -1.0, -0.1, 0.5]], dtype=torch.float64)


def kd_inputs(student: torch.Tensor, teacher: torch.Tensor) -> KDInputs:
    s_hat, t_hat = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    return KDInputs(student, teacher, s_hat, t_hat, (s_hat * t_hat).sum(dim=1))


def park_rkd(student, teacher, distance_weight, angle_weight):
    """RKD as Park et al. describe it: explicit pairwise differences and triplet angles."""
    def distances(e):
        diff = e.unsqueeze(0) - e.unsqueeze(1)
        d = diff.norm(dim=2)
        return d / d[d > 0].mean()

    def angles(e):
        diff = e.unsqueeze(0) - e.unsqueeze(1)            # [i, j] = e_j - e_i
        unit = F.normalize(diff, p=2, dim=2)
        return torch.bmm(unit, unit.transpose(1, 2))      # [i, j, k] = cos∠(e_j - e_i, e_k - e_i)

    s, t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    return (distance_weight * F.smooth_l1_loss(distances(s), distances(t))
            + angle_weight * F.smooth_l1_loss(angles(s), angles(t)))


def test_l2_and_fc_equal_the_formulas():
    inputs = kd_inputs(STUDENT, TEACHER)
    l2 = sum(((a - b) ** 2).sum() for a, b in zip(STUDENT, TEACHER)) / 4
    fc = sum(1 - (a @ b) / (a.norm() * b.norm()) for a, b in zip(STUDENT, TEACHER)) / 4
    assert L2Distillation()(inputs).item() == pytest.approx(l2.item(), rel=1e-13)
    assert FeatureConsistency()(inputs).item() == pytest.approx(fc.item(), rel=1e-13)


@pytest.mark.parametrize("weights", [(1.0, 2.0), (1.0, 0.0), (0.0, 1.0)])
def test_rkd_equals_park_et_al(weights):
    value = RelationalKD(*weights)(kd_inputs(STUDENT, TEACHER))
    assert value.item() == pytest.approx(park_rkd(STUDENT, TEACHER, *weights).item(), rel=1e-10)


def test_rkd_gradient_equals_park_et_al():
    student = STUDENT.clone().requires_grad_()
    RelationalKD()(kd_inputs(student, TEACHER)).backward()
    reference = STUDENT.clone().requires_grad_()
    park_rkd(reference, TEACHER, 1.0, 2.0).backward()
    torch.testing.assert_close(student.grad, reference.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("term", [L2Distillation(), FeatureConsistency(), RelationalKD()],
                         ids=["l2", "fc", "rkd"])
def test_gradcheck(term):
    assert torch.autograd.gradcheck(lambda s: term(kd_inputs(s, TEACHER)),
                                    (STUDENT.clone().requires_grad_(),))
