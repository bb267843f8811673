"""Per-term diagnostics of the objective (METHOD D1): what each term does to the student.

For every enabled term ``k`` of (E5) this measures, on the **global** batch:

- ``grad_norm/<k>``: ``‖∂(λ_k·L_k)/∂F_s‖``, the Frobenius norm of the gradient that the
  weighted term sends to the student embeddings ``F_s`` ``[G, D]`` (one autograd call per term
  on the embeddings only: the backbone is not traversed);
- ``grad_share/<k>``: that norm over the sum of the norms of all terms;
- ``loss_share/<k>``: ``λ_k·L_k`` over the total;

and, per term, how much of the batch its mining still selects:

- ``iled/below_target``: the fraction of samples with ``c_i < s`` (E2);
- ``rpsd/above_tolerance``: the fraction of relation pairs with ``|Δ_ij| > t``, and
  ``rpsd/mean_gap``: the mean ``|Δ_ij|`` (E4).

Each rank's value is its share of the objective (see :mod:`fr_distill.losses.objective`):
the 1-rank gradient of sample ``i`` is ``g_i / W`` where ``g_i`` is the gradient on its rank,
so ``‖∂L/∂F_s‖ = sqrt(Σ_ranks ‖g‖²) / W``. Everything is reduced with one all-reduce and stays
on the device; the graph is kept, so the backward that follows computes exactly what it
would have computed without the diagnostics.
"""
from __future__ import annotations

import torch

from fr_distill import dist


def term_diagnostics(weighted: dict[str, torch.Tensor], f_s: torch.Tensor,
                     statistics: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """METHOD D1 for the weighted terms ``{name: λ_k·L_k}`` (with graph to ``f_s``, this rank's
    embeddings ``[B, D]``) and the terms' mining ``statistics`` ``{name: (sum, count)}``.

    A collective: every rank calls it on the same step. Returns global values (device tensors).
    """
    names = list(weighted)
    squares = []
    for name in names:
        value = weighted[name]
        if value.requires_grad:
            (grad,) = torch.autograd.grad(value, f_s, retain_graph=True, allow_unused=True)
        else:
            grad = None
        squares.append(grad.detach().float().pow(2).sum() if grad is not None
                       else torch.zeros((), device=f_s.device))
    stat_names = list(statistics)
    local = torch.stack([*squares, *(weighted[n].detach().float() for n in names),
                         *(s.float() for pair in statistics.values() for s in pair)])
    world = dist.world_size()
    summed = dist.all_reduce_sum(local)
    k = len(names)
    norms = summed[:k].sqrt() / world
    values = summed[k:2 * k] / world
    norm_total = norms.sum().clamp_min(1e-30)
    value_total = values.sum()
    out: dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        out[f"grad_norm/{name}"] = norms[i]
        out[f"grad_share/{name}"] = norms[i] / norm_total
        out[f"loss_share/{name}"] = values[i] / value_total
    stats = summed[2 * k:].view(-1, 2)
    for i, name in enumerate(stat_names):
        out[name] = stats[i, 0] / stats[i, 1].clamp_min(1.0)
    return out
