"""Baseline distillation terms the paper compares against: METHOD (E6).

* ``l2``  — ``mean_i ‖f^s_i − f^t_i‖²`` on the unnormalized embeddings.
* ``fc``  — feature consistency ``mean_i (1 − c_i)``.
* ``rkd`` — relational KD (Park et al., CVPR 2019) on the normalized embeddings of the
  **global** batch: distance term (pairwise distances divided by their mean, smooth-L1) and
  angle term (smooth-L1 on the cosines of the angles ``∠(e_j − e_i, e_k − e_i)``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fr_distill import dist
from fr_distill.losses.kd_inputs import KDInputs

DISTANCE_EPS = 1e-12  # squared distances are clamped here before the square root


class L2Distillation(nn.Module):
    """METHOD (E6) ``l2``: mean squared L2 distance between raw student and teacher embeddings."""

    def forward(self, inputs: KDInputs) -> torch.Tensor:
        return (inputs.student - inputs.teacher).pow(2).sum(dim=1).mean()


class FeatureConsistency(nn.Module):
    """METHOD (E6) ``fc``: ``mean_i (1 − c_i)``."""

    def forward(self, inputs: KDInputs) -> torch.Tensor:
        return (1.0 - inputs.cosine).mean()


def pairwise_distances(gram: torch.Tensor) -> torch.Tensor:
    """Euclidean distances from a Gram matrix; the diagonal is exactly 0 (and has no gradient)."""
    squared = gram.diagonal().unsqueeze(0) + gram.diagonal().unsqueeze(1) - 2.0 * gram
    eye = torch.eye(gram.shape[0], dtype=torch.bool, device=gram.device)
    return torch.where(eye, 0.0, squared.clamp_min(DISTANCE_EPS).sqrt())


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD distance term: smooth-L1 between the ``N × N`` distance matrices, each divided by
    the mean of its off-diagonal entries (Park et al. divide by the mean positive distance;
    this equals it for distinct embeddings and needs no host sync)."""
    n = student.shape[0]
    with torch.no_grad():
        d_teacher = pairwise_distances(teacher @ teacher.t())
        d_teacher = d_teacher / (d_teacher.sum() / (n * (n - 1)))
    d_student = pairwise_distances(student @ student.t())
    d_student = d_student / (d_student.sum() / (n * (n - 1)))
    return F.smooth_l1_loss(d_student, d_teacher)


def triplet_angles(embeddings: torch.Tensor) -> torch.Tensor:
    """``[N, N, N]`` cosines of ``∠(e_j − e_i, e_k − e_i)`` at index ``[i, j, k]``.

    From the Gram matrix ``⟨e_j − e_i, e_k − e_i⟩ = G_jk − G_ij − G_ik + G_ii`` (no ``N² × D``
    difference tensor); entries with ``j = i`` or ``k = i`` are 0, as for Park et al.'s
    normalized zero vectors.
    """
    gram = embeddings @ embeddings.t()
    distance = pairwise_distances(gram)
    diagonal = gram.diagonal()
    inner = (gram.unsqueeze(0) - gram.unsqueeze(2) - gram.unsqueeze(1)
             + diagonal.view(-1, 1, 1))
    scale = distance.unsqueeze(2) * distance.unsqueeze(1)
    valid = scale > 0
    return torch.where(valid, inner / torch.where(valid, scale, 1.0), 0.0)


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD angle term: smooth-L1 between the triplet-angle cosines of student and teacher."""
    with torch.no_grad():
        a_teacher = triplet_angles(teacher)
    return F.smooth_l1_loss(triplet_angles(student), a_teacher)


class RelationalKD(nn.Module):
    """METHOD (E6) ``rkd``: ``distance_weight·distance + angle_weight·angle`` over the global batch.

    The student embeddings are all-gathered with gradient, the teacher's without; every rank
    computes the same value, and the gather's backward (a sum over ranks) followed by DDP's
    average gives each rank the 1-rank gradient of its own samples.
    """

    def __init__(self, distance_weight: float = 1.0, angle_weight: float = 2.0) -> None:
        super().__init__()
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight} angle_weight={self.angle_weight}"

    def forward(self, inputs: KDInputs) -> torch.Tensor:
        student = dist.all_gather_with_grad(inputs.student_hat)
        teacher = dist.all_gather_cat(inputs.teacher_hat)
        if student.shape[0] < 2:
            return (student * 0.0).sum()
        return (self.distance_weight * rkd_distance(student, teacher)
                + self.angle_weight * rkd_angle(student, teacher))
