"""Adaptive term balancing: METHOD (E7).

Each balanced distillation term ``k`` carries a weight ``λ_k`` that is set from the per-term
diagnostics of METHOD (D1) so that the norm of the gradient it sends to the student
embeddings is a target fraction ``ρ_k`` of the face-recognition term's:

    λ*_k = ρ_k · ‖∂(λ_FR·L_FR)/∂F_s‖ / ‖∂L_k/∂F_s‖
    log λ_k ← clamp((1 − β)·log λ_k + β·log λ*_k, log λ_min, log λ_max)

The norms are D1's, on the global batch, so the update is identical on every rank; it is
made on logging steps only (where D1 is computed) and entirely on the device, so the step
keeps its single host read. A weight is kept when its update is undefined: the
face-recognition gradient is zero or non-finite (then every weight is kept and ``held`` is
set, for the logger to say so), or the term's own gradient is (RPSD before the memory bank
holds a row). The weights are a buffer of the module, so they are part of the objective's
checkpoint state and a resumed run continues with them.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

#: The diagnostics key of the reference term (METHOD D1 names terms by their objective key).
REFERENCE = "sphereface2"


class TermBalancer(nn.Module):
    """METHOD (E7) for the terms ``targets`` (name → ρ_k), starting from ``initial`` weights."""

    def __init__(self, targets: dict[str, float], initial: dict[str, float], smoothing: float,
                 min_weight: float, max_weight: float, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.names = list(targets)
        self.smoothing = smoothing
        self.log_min, self.log_max = math.log(min_weight), math.log(max_weight)
        start = [min(max(initial[n], min_weight), max_weight) for n in self.names]
        self.register_buffer("weights", torch.tensor(start, dtype=torch.float32, device=device))
        # the targets come from the config, also on resume (not part of the checkpoint)
        self.register_buffer("targets", torch.tensor([targets[n] for n in self.names],
                                                     dtype=torch.float32, device=device),
                             persistent=False)

    def extra_repr(self) -> str:
        return (f"targets={dict(zip(self.names, self.targets.tolist()))} "
                f"smoothing={self.smoothing} bounds=[{math.exp(self.log_min):g}, "
                f"{math.exp(self.log_max):g}]")

    def weight(self, name: str) -> torch.Tensor:
        """``λ_k`` of term ``name`` as a 0-d device tensor (no host read)."""
        return self.weights[self.names.index(name)]

    @torch.no_grad()
    def update(self, diagnostics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Move every weight towards its target from D1's ``grad_norm/<k>`` (measured with the
        current weights); returns the new weights (``balance/<k>``) and ``balance/held`` (1 when
        the face-recognition gradient was unusable and every weight was kept)."""
        reference = diagnostics[f"grad_norm/{REFERENCE}"].float()
        weighted = torch.stack([diagnostics[f"grad_norm/{n}"].float() for n in self.names])
        unit = weighted / self.weights  # ‖∂L_k/∂F_s‖, the term's gradient at weight 1
        usable_reference = torch.isfinite(reference) & (reference > 0)
        usable = usable_reference & torch.isfinite(unit) & (unit > 0)
        wanted = torch.log(self.targets) + torch.log(reference) - torch.log(unit)
        moved = ((1 - self.smoothing) * torch.log(self.weights) + self.smoothing * wanted)
        moved = torch.exp(moved.clamp(self.log_min, self.log_max))
        self.weights.copy_(torch.where(usable, moved, self.weights))
        out = {f"balance/{n}": self.weights[i].clone() for i, n in enumerate(self.names)}
        out["balance/held"] = (~usable_reference).float()
        return out
