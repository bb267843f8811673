"""Adaptive term balancing (METHOD E7), in one process: the balanced weight against the one
computed by hand, the update rule, the cases where it must keep its weights, the weights as
checkpoint state."""
from __future__ import annotations

import math

import pytest
import torch

from fr_distill.config import LossConfig
from fr_distill.losses import build_objective
from fr_distill.losses.balance import TermBalancer

C, D, B = 6, 8, 5


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, D, generator=g, requires_grad=True), torch.randn(B, D, generator=g),
            torch.randint(0, C, (B,), generator=g))


def _l2_balanced(target: float, smoothing: float, weight: float = 1.0) -> LossConfig:
    cfg = LossConfig()
    cfg.iled.weight, cfg.rpsd.weight, cfg.l2.weight = 0.0, 0.0, weight
    cfg.balance.enabled, cfg.balance.l2, cfg.balance.smoothing = True, target, smoothing
    return cfg


def test_balanced_weight_equals_the_hand_computed_one():
    """With β = 1 one update sets λ_l2 so that ‖∂(λ·L_l2)/∂F_s‖ = ρ·‖∂L_FR/∂F_s‖, where the l2
    gradient is 2(F_s − F_t)/B (E6) and SphereFace2's comes from a separate autograd call."""
    torch.manual_seed(0)
    objective = build_objective(_l2_balanced(0.25, 1.0, weight=3.0), C, D, D, global_batch=B)
    f_s, f_t, labels = _batch()
    out = objective(f_s, f_t, labels)
    diagnostics = objective.diagnostics(out, f_s)
    (fr_grad,) = torch.autograd.grad(out.weighted["sphereface2"], f_s, retain_graph=True)
    l2_unit_norm = (2 * (f_s - f_t) / B).norm().detach()  # ‖∂L_l2/∂F_s‖ at weight 1, by hand
    assert float(diagnostics["grad_norm/l2"]) == pytest.approx(3.0 * float(l2_unit_norm),
                                                               rel=1e-5)
    logged = objective.balance(diagnostics)
    expected = 0.25 * float(fr_grad.norm()) / float(l2_unit_norm)
    assert float(objective.term_weight("l2")) == pytest.approx(expected, rel=1e-5)
    assert float(logged["balance/l2"]) == float(objective.term_weight("l2"))
    assert float(logged["balance/held"]) == 0.0
    out = objective(f_s, f_t, labels)  # the new weight is what the next forward uses
    ratio = objective.diagnostics(out, f_s)
    assert float(ratio["grad_norm/l2"] / ratio["grad_norm/sphereface2"]) == pytest.approx(
        0.25, rel=1e-5)


def _diagnostics(reference: float, **weighted: float) -> dict[str, torch.Tensor]:
    out = {"grad_norm/sphereface2": torch.tensor(reference)}
    out.update({f"grad_norm/{k}": torch.tensor(v) for k, v in weighted.items()})
    return out


def test_update_is_a_smoothed_step_in_log_space_and_converges():
    """λ ← λ^(1−β)·(λ*)^β with λ* = ρ·g_FR/u; repeated on fixed unit norms it converges to λ*."""
    balancer = TermBalancer({"iled": 0.5, "rpsd": 2.0}, {"iled": 1.0, "rpsd": 40.0}, 0.5,
                            1e-3, 1e3)
    unit = {"iled": 0.02, "rpsd": 0.001}  # gradient norms at weight 1
    wanted = {"iled": 0.5 * 0.1 / 0.02, "rpsd": 2.0 * 0.1 / 0.001}  # 2.5 and 200
    weights = [1.0, 40.0]
    for _ in range(30):
        current = dict(zip(("iled", "rpsd"), balancer.weights.tolist()))
        balancer.update(_diagnostics(0.1, **{k: current[k] * unit[k] for k in unit}))
        weights = [math.sqrt(w * wanted[k]) for w, k in zip(weights, ("iled", "rpsd"))]
        assert balancer.weights.tolist() == pytest.approx(weights, rel=1e-5)
    assert balancer.weights.tolist() == pytest.approx([2.5, 200.0], rel=1e-6)


def test_bounds_clamp_and_unusable_gradients_keep_the_weights():
    balancer = TermBalancer({"iled": 1.0, "rpsd": 1.0}, {"iled": 1.0, "rpsd": 40.0}, 1.0, 0.01, 100.0)
    balancer.update(_diagnostics(1.0, iled=1e-6, rpsd=1e6))  # λ* = 1e6 and 4e-5
    assert balancer.weights.tolist() == pytest.approx([100.0, 0.01])
    before = balancer.weights.clone()
    for reference in (0.0, float("nan"), float("inf")):  # the face-recognition gradient
        logged = balancer.update(_diagnostics(reference, iled=1.0, rpsd=1.0))
        assert torch.equal(balancer.weights, before) and float(logged["balance/held"]) == 1.0
    logged = balancer.update(_diagnostics(1.0, iled=100.0, rpsd=0.0))  # RPSD: an empty bank
    assert float(logged["balance/held"]) == 0.0
    assert balancer.weights.tolist() == pytest.approx([1.0, 0.01])  # iled moved, rpsd kept


def test_balanced_weights_are_checkpoint_state_and_targets_are_not():
    torch.manual_seed(0)
    objective = build_objective(_l2_balanced(0.25, 1.0), C, D, D, global_batch=B)
    objective.balancer.weights.fill_(7.0)
    state = objective.state_dict()
    assert "balancer.weights" in state and "balancer.targets" not in state
    torch.manual_seed(0)
    resumed = build_objective(_l2_balanced(0.5, 1.0), C, D, D, global_batch=B)
    resumed.load_state_dict(state)
    assert float(resumed.term_weight("l2")) == 7.0 and resumed.balancer.targets.tolist() == [0.5]
