"""Per-term diagnostics (METHOD D1) against a hand computation on a small objective."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fr_distill.config import LossConfig
from fr_distill.losses import build_objective

C, D, B = 9, 5, 6


def small_objective(anchor: str = "student_bank"):
    cfg = LossConfig()
    cfg.iled.weight, cfg.rpsd.weight, cfg.fc.weight = 0.7, 40.0, 2.0
    cfg.rpsd.student_anchor = anchor
    torch.manual_seed(0)
    objective = build_objective(cfg, C, D, D, global_batch=B)
    g = torch.Generator().manual_seed(3)
    # a student close to the teacher on some samples, so that the mining fractions are not 0 or 1
    f_t = torch.randn(B, D, generator=g, dtype=torch.float64)
    f_s = f_t + torch.randn(B, D, generator=g, dtype=torch.float64) * torch.tensor(
        [0.05, 0.1, 2.0, 3.0, 0.2, 5.0], dtype=torch.float64)[:, None]
    bank_t, bank_s = F.normalize(torch.randn(2 * B, D, generator=g), dim=1), \
        F.normalize(torch.randn(2 * B, D, generator=g), dim=1)
    objective.bank.enqueue(bank_t, bank_s)
    labels = torch.randint(0, C, (B,), generator=g)
    return objective, f_s.float().requires_grad_(True), f_t.float(), labels, bank_t, bank_s


def iled_gradient_by_hand(f_s, f_t, r, s, b, weight):
    """∂(λ·mean_i ω_i·softplus_r(s − c_i + b/r))/∂f_i = −(λ/B)·ω_i·σ(r(s − c_i) + b)·∂c_i/∂f_i,
    with ∂c_i/∂f_i = (t̂_i − c_i·ŝ_i)/‖f_i‖ and ω_i = (1 − c_i)/mean(1 − c) held constant."""
    f_s, f_t = f_s.detach().double(), f_t.double()
    s_hat, t_hat = F.normalize(f_s, dim=1), F.normalize(f_t, dim=1)
    c = (s_hat * t_hat).sum(1)
    omega = (1 - c) / (1 - c).mean()
    dc_df = (t_hat - c[:, None] * s_hat) / f_s.norm(dim=1, keepdim=True)
    return -(weight / len(c)) * (omega * torch.sigmoid(r * (s - c) + b))[:, None] * dc_df, c


def fc_gradient_by_hand(f_s, f_t, weight):
    """∂(λ·mean_i (1 − c_i))/∂f_i = −(λ/B)·∂c_i/∂f_i."""
    f_s, f_t = f_s.detach().double(), f_t.double()
    s_hat, t_hat = F.normalize(f_s, dim=1), F.normalize(f_t, dim=1)
    c = (s_hat * t_hat).sum(1)
    return -(weight / len(c)) * (t_hat - c[:, None] * s_hat) / f_s.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("anchor", ["student_bank", "teacher_bank"])
def test_gradient_norms_shares_and_mining_fractions_match_a_hand_computation(anchor):
    objective, f_s, f_t, labels, bank_t, bank_s = small_objective(anchor)
    out = objective(f_s, f_t, labels)
    diag = {k: v.item() for k, v in objective.diagnostics(out, f_s).items()}

    iled, c = iled_gradient_by_hand(f_s, f_t, 40.0, 0.9, 0.1, 0.7)
    assert diag["grad_norm/iled"] == pytest.approx(iled.norm().item(), rel=1e-5)
    assert diag["grad_norm/fc"] == pytest.approx(fc_gradient_by_hand(f_s, f_t, 2.0).norm().item(),
                                                  rel=1e-5)
    # SphereFace2 and RPSD: the gradient of each weighted term on its own
    f = f_s.detach().clone().requires_grad_(True)
    (g_sf,) = torch.autograd.grad(objective.head(f, labels), f)
    assert diag["grad_norm/sphereface2"] == pytest.approx(g_sf.norm().item(), rel=1e-5)
    s_hat, t_hat = F.normalize(f, dim=1), F.normalize(f_t, dim=1)
    anchor_rows = bank_s if anchor == "student_bank" else bank_t
    gap = (s_hat @ anchor_rows.t() - t_hat @ bank_t.t()).abs()
    rpsd = 40.0 * (F.softplus(60.0 * (gap - 0.05) + 1.0) / 60.0).mean()
    (g_rpsd,) = torch.autograd.grad(rpsd, f)
    assert diag["grad_norm/rpsd"] == pytest.approx(g_rpsd.norm().item(), rel=1e-5)

    norms = {k: diag[f"grad_norm/{k}"] for k in ("sphereface2", "iled", "rpsd", "fc")}
    weighted = {"sphereface2": out.terms["sphereface2"].item(), "iled": 0.7 * out.terms["iled"].item(),
                "rpsd": 40.0 * out.terms["rpsd"].item(), "fc": 2.0 * out.terms["fc"].item()}
    for k in norms:
        assert diag[f"grad_share/{k}"] == pytest.approx(norms[k] / sum(norms.values()), rel=1e-5)
        assert diag[f"loss_share/{k}"] == pytest.approx(weighted[k] / sum(weighted.values()), rel=1e-5)
    below = (c < 0.9).double().mean().item()
    assert 0 < below < 1 and diag["iled/below_target"] == pytest.approx(below)
    above = (gap > 0.05).double().mean().item()
    assert 0 < above < 1 and diag["rpsd/above_tolerance"] == pytest.approx(above)
    assert diag["rpsd/mean_gap"] == pytest.approx(gap.mean().item(), rel=1e-5)


def test_diagnostics_leave_the_backward_unchanged_bitwise():
    grads = []
    for diagnose in (False, True):
        objective, f_s, f_t, labels, _, _ = small_objective()
        out = objective(f_s, f_t, labels)
        if diagnose:
            objective.diagnostics(out, f_s)
        out.total.backward()
        grads.append((f_s.grad.clone(), objective.head.weight.grad.clone(),
                      objective.head.bias.grad.clone()))
    for without, with_diagnostics in zip(*grads):
        assert torch.equal(without, with_diagnostics)


def test_rpsd_statistics_are_zero_on_an_empty_bank():
    cfg = LossConfig()
    objective = build_objective(cfg, C, D, D, global_batch=B)
    g = torch.Generator().manual_seed(0)
    f_s = torch.randn(B, D, generator=g, requires_grad=True)
    out = objective(f_s, torch.randn(B, D, generator=g), torch.randint(0, C, (B,), generator=g))
    diag = objective.diagnostics(out, f_s)
    assert diag["rpsd/above_tolerance"].item() == 0.0 and diag["grad_norm/rpsd"].item() == 0.0
    assert diag["grad_share/sphereface2"].item() + diag["grad_share/iled"].item() == pytest.approx(1.0)
