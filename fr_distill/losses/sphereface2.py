"""SphereFace2-C, the face-recognition loss of METHOD (E1), replicated or class-sharded.

SphereFace2 scores every (sample, class) pair as an independent binary problem, so the loss
is a plain sum over classes and the classifier can be split by class across ranks with no
approximation (unlike a softmax head, which needs Partial FC sampling at millions of
identities). Layout: ``W`` is ``[C, D]`` (one row per class); OpenSphere stores its
transpose and normalizes columns, which is the same computation.

Gradient contract (what the trainer does after ``backward``: DDP averages student gradients
over the ``W`` ranks, ``replicated_parameters`` are averaged, sharded rows are not):

* ``replicated``: each rank computes the mean over its own ``B × C`` terms; the average of
  these over ranks is the loss of the global batch, and every averaged gradient is the
  1-rank gradient.
* ``class_sharded``: rank ``k`` holds the contiguous class rows ``[start_k, end_k)``,
  all-gathers features (differentiably) and labels, and computes ``S_k``, the sum of its
  rows' terms over the global batch divided by ``G·C``; the 1-rank loss is ``Σ_k S_k``.
  The rank returns ``W·S_k`` so that (i) the average over ranks is the 1-rank loss, (ii) the
  feature gradients, summed over ranks by the gather's backward and then averaged by DDP,
  are the 1-rank gradients, and (iii) the replicated bias, averaged, gets ``Σ_k ∂S_k/∂b``.
  The rank's own rows receive their gradient scaled back by ``1/W``, i.e. ``∂S_k/∂W_k``,
  which is the 1-rank gradient of those rows and is not averaged.

Checkpoints hold the full ``[C, D]`` matrix in both modes: ``state_dict`` of a sharded head
gathers the rows (a collective: call it on every rank), ``load_state_dict`` keeps this rank's
rows. A checkpoint therefore resumes with any world size and either mode. For a sharded
checkpoint (``checkpoint.format=dcp``), ``gather_on_save = False`` makes ``state_dict`` hold
this rank's rows tagged with their place in the matrix (:func:`fr_distill.dist.row_block`),
and ``load_state_dict`` takes such a block of this rank's rows as it takes the whole matrix.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fr_distill import dist
from fr_distill.losses.errors import ObjectiveInputError, shape_of

INIT_BLOCK_ROWS = 65536  # the initial matrix is drawn in blocks of this many rows


def initial_bias(num_classes: int, lamb: float, r: float, m: float, t: float) -> float:
    """Closed-form bias initialization of METHOD (E1) (SphereFace2-C)."""
    z = lamb / ((1.0 - lamb) * (num_classes - 1.0))
    a_y = r * (2.0 * 0.5 ** t - 1.0 - m)
    a_i = r * (2.0 * 0.5 ** t - 1.0 + m)
    root = math.sqrt((1.0 - z) ** 2 + 4.0 * z * math.exp(a_y - a_i))
    return math.log(2.0 * z) - a_i - math.log(1.0 - z + root)


def class_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of rank ``rank``: ``C`` split as evenly as possible, in order."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def initial_weight_rows(num_classes: int, dim: int, start: int, end: int,
                        seed: int) -> torch.Tensor:
    """Rows ``[start, end)`` of a ``[C, D]`` xavier-normal matrix (std ``sqrt(2/(C+D))``).

    Block ``b`` (rows ``b·INIT_BLOCK_ROWS …``) is drawn from a CPU generator seeded with
    ``seed + b``, so a rank draws only the blocks it holds and the matrix is the same for
    every world size and for both head modes. The head takes ``seed`` from the global RNG of
    rank 0 (broadcast), so all ranks agree whatever their own RNG state.
    """
    std = math.sqrt(2.0 / (num_classes + dim))
    parts = []
    generator = torch.Generator()
    for block in range(start // INIT_BLOCK_ROWS, -(-end // INIT_BLOCK_ROWS)):
        first = block * INIT_BLOCK_ROWS
        rows = min(INIT_BLOCK_ROWS, num_classes - first)
        generator.manual_seed(seed + block)
        drawn = torch.randn(rows, dim, generator=generator) * std
        parts.append(drawn[max(start - first, 0):min(end - first, rows)])
    return torch.cat(parts) if parts else torch.empty(0, dim)


def margin_offsets(cos: torch.Tensor, target_col: torch.Tensor, m: float,
                   t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``sg[g − cos]`` of METHOD (E1) for every entry as a negative, and for each row's target.

    ``g = 2((cos+1)/2)^t − 1 − m(2y − 1)``; negatives use ``y = 0`` (``+m``), the target entry
    ``y = 1`` (``−m``). ``target_col`` is the column of each row's label in ``cos``
    (``-1``: the label is not among these columns); such rows get a target offset of 0,
    which :func:`sphereface2_sum` masks out.
    """
    with torch.no_grad():
        g = 2.0 * ((cos + 1.0) / 2.0).pow(t) - 1.0
        negative = g + m - cos
        if cos.shape[1] == 0:
            return negative, cos.new_zeros(cos.shape[0])
        col = target_col.clamp_min(0).unsqueeze(1)
        positive = (negative.gather(1, col).squeeze(1) - 2.0 * m) * (target_col >= 0)
    return negative, positive


def sphereface2_sum(cos: torch.Tensor, target_col: torch.Tensor, bias: torch.Tensor,
                    offsets: tuple[torch.Tensor, torch.Tensor], *, num_classes: int, lamb: float,
                    r: float, lw: float) -> torch.Tensor:
    """``Σ_ij w_ij · BCEWithLogits(logit_ij, y_ij)`` of METHOD (E1) over a block of ``cos``.

    ``logit_ij = r(cos_ij + sg[g_ij − cos_ij]) + b`` with the offsets of
    :func:`margin_offsets`. Computed as: every entry as a negative, plus for each row whose
    label is in the block the difference between its positive and negative term, so no
    ``B × C`` one-hot or weight matrix is built.
    """
    negative_offset, positive_offset = offsets
    w_pos = lw * num_classes / r * lamb
    w_neg = lw * num_classes / r * (1.0 - lamb)
    negative_logits = r * (cos + negative_offset) + bias
    total = w_neg * F.softplus(negative_logits).sum()
    if cos.shape[1] == 0:
        return total
    has_target = target_col >= 0
    col = target_col.clamp_min(0).unsqueeze(1)
    cos_y = cos.gather(1, col).squeeze(1)
    positive_logits = r * (cos_y + positive_offset) + bias
    as_negative = negative_logits.gather(1, col).squeeze(1)
    correction = w_pos * F.softplus(-positive_logits) - w_neg * F.softplus(as_negative)
    return total + (correction * has_target).sum()


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class SphereFace2Head(nn.Module):
    """METHOD (E1): the SphereFace2-C classifier ``W`` (rows L2-normalized in place at every
    forward), the learnable bias ``b`` and the loss; ``class_sharded`` splits ``W`` by class
    across ranks (see the module docstring for the gradient scaling).
    """

    def __init__(self, num_classes: int, dim: int, *, lamb: float = 0.7, r: float = 40.0,
                 m: float = 0.4, t: float = 3.0, lw: float = 10.0, class_sharded: bool = False,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        if num_classes < 2:
            raise ObjectiveInputError(f"SphereFace2 needs at least 2 classes, got "
                                      f"num_classes={num_classes}")
        self.num_classes, self.dim = num_classes, dim
        self.lamb, self.r, self.m, self.t, self.lw = lamb, r, m, t, lw
        self.class_sharded = class_sharded
        self.gather_on_save = True  # False: state_dict() holds this rank's rows (dist.row_block)
        self.world_size = dist.world_size() if class_sharded else 1
        self.start, self.end = class_range(num_classes, self.world_size,
                                           dist.rank() if class_sharded else 0)
        seed = dist.broadcast_object(int(torch.randint(0, 2 ** 62, (1,)).item()))
        self.weight = nn.Parameter(
            initial_weight_rows(num_classes, dim, self.start, self.end, seed).to(device))
        self.bias = nn.Parameter(torch.full((1,), initial_bias(num_classes, lamb, r, m, t),
                                            device=device))

    def extra_repr(self) -> str:
        return (f"classes={self.num_classes} rows=[{self.start}, {self.end}) dim={self.dim} "
                f"lamb={self.lamb} r={self.r} m={self.m} t={self.t} lw={self.lw} "
                f"class_sharded={self.class_sharded}")

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This rank's share of the loss for ``features`` ``[B, D]`` and ``labels`` ``[B]``."""
        with torch.no_grad():  # as F.normalize(dim=1), without a second [C, D] buffer
            norms = torch.linalg.vector_norm(self.weight, dim=1, keepdim=True)
            self.weight.div_(norms.clamp_min_(1e-12))
        weight = self.weight
        if self.world_size > 1:
            features = dist.all_gather_with_grad(features)
            labels = dist.all_gather_cat(labels)
            weight = _ScaleGrad.apply(weight, 1.0 / self.world_size)
        cos = F.normalize(features, dim=1) @ weight.t()
        in_block = (labels >= self.start) & (labels < self.end)
        target_col = torch.where(in_block, labels - self.start, -1)
        offsets = margin_offsets(cos.detach(), target_col, self.m, self.t)
        total = sphereface2_sum(cos, target_col, self.bias, offsets, num_classes=self.num_classes,
                                lamb=self.lamb, r=self.r, lw=self.lw)
        return total * (self.world_size / (features.shape[0] * self.num_classes))

    # -- checkpoint format: the full [C, D] matrix, whatever the mode and world size ----------
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        if self.world_size > 1 and self.gather_on_save:
            destination[prefix + "weight"] = dist.all_gather_rows(self.weight.detach(),
                                                                  device="cpu")
            destination[prefix + "bias"] = self.bias.detach()
        else:
            super()._save_to_state_dict(destination, prefix, keep_vars)
            if not self.gather_on_save:
                dist.row_block(destination[prefix + "weight"], self.start, self.num_classes)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        keys = {name: prefix + name for name in ("weight", "bias")}
        absent = [key for key in keys.values() if key not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return
        weight, bias = state_dict[keys["weight"]], state_dict[keys["bias"]]
        if dist.global_shape(weight) != (self.num_classes, self.dim):
            raise ObjectiveInputError(
                f"objective state '{keys['weight']}' has shape {list(dist.global_shape(weight))};"
                f" this run's head is [{self.num_classes}, {self.dim}] (num_classes, embedding "
                f"dim)")
        if bias.numel() != 1:
            raise ObjectiveInputError(f"objective state '{keys['bias']}' has shape "
                                      f"{shape_of(bias)}; expected [1]")
        with torch.no_grad():
            self.weight.copy_(dist.rows_of(weight, self.start, self.end))
            self.bias.copy_(bias.reshape(1))
