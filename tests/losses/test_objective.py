"""Unified objective, METHOD (E5): weighted sum of separately reported terms, float32 under
autocast, projector, one-line errors for bad input, bank update and state, configs."""
from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import yaml
import torch
import torch.nn.functional as F

from fr_distill.config import LossConfig, load_config
from fr_distill.losses import ObjectiveInputError, build_objective
from fr_distill.losses.baselines import RelationalKD
from fr_distill.losses.iled import ILED
from fr_distill.losses.kd_inputs import KDInputs
from fr_distill.study import load_spec

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
C, DS, DT, B = 11, 6, 6, 4


def all_terms() -> LossConfig:
    cfg = LossConfig()
    cfg.l2.weight, cfg.fc.weight, cfg.rkd.weight = 0.5, 2.0, 3.0
    return cfg


def batch(seed: int = 0, ds: int = DS, dt: int = DT):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, ds, generator=g, requires_grad=True), torch.randn(B, dt, generator=g),
            torch.randint(0, C, (B,), generator=g))


def test_total_is_the_weighted_sum_of_the_reported_terms():
    torch.manual_seed(0)
    objective = build_objective(all_terms(), C, DS, DT, global_batch=B)
    f_s, f_t, labels = batch()
    objective.update_bank(*batch(1)[:2])
    out = objective(f_s, f_t, labels)
    assert set(out.terms) == {"sphereface2", "iled", "rpsd", "l2", "fc", "rkd"}
    weights = {"sphereface2": 1.0, "iled": 7.0, "rpsd": 40.0, "l2": 0.5, "fc": 2.0, "rkd": 3.0}
    expected = sum(weights[k] * v for k, v in out.terms.items())
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(not v.requires_grad and v.dtype == torch.float32 for v in out.terms.values())
    s_hat, t_hat = F.normalize(f_s, dim=1), F.normalize(f_t, dim=1)
    cosine = (s_hat * t_hat).sum(1)
    assert out.cosine.item() == pytest.approx(cosine.mean().item(), rel=1e-6)
    inputs = KDInputs(f_s, f_t, s_hat, t_hat, cosine)
    assert out.terms["iled"].item() == pytest.approx(ILED()(inputs).item(), rel=1e-6)
    assert out.terms["rkd"].item() == pytest.approx(RelationalKD()(inputs).item(), rel=1e-6)
    out.total.backward()
    assert torch.isfinite(f_s.grad).all() and objective.head.weight.grad is not None


def test_terms_are_float32_under_autocast_and_equal_the_float32_values():
    torch.manual_seed(0)
    objective = build_objective(all_terms(), C, DS, DT, global_batch=B)
    f_s, f_t, labels = batch()
    objective.update_bank(*batch(1)[:2])
    twin = copy.deepcopy(objective)  # the head renormalizes its rows in place at each call
    low_s, low_t = f_s.detach().bfloat16(), f_t.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = objective(low_s.requires_grad_(), low_t, labels)
    plain = twin(low_s.float(), low_t.float(), labels)
    assert auto.total.dtype == torch.float32
    for name in plain.terms:
        assert auto.terms[name].dtype == torch.float32
        assert torch.equal(auto.terms[name], plain.terms[name]), name


def test_only_enabled_terms_are_built_and_the_bank_only_with_rpsd():
    cfg = LossConfig()
    cfg.rpsd.weight = 0.0
    objective = build_objective(cfg, C, DS, DT, global_batch=B)
    assert objective.bank is None
    f_s, f_t, labels = batch()
    objective.update_bank(f_s.detach(), f_t)  # no-op
    assert set(objective(f_s, f_t, labels).terms) == {"sphereface2", "iled"}
    scratch = LossConfig()
    scratch.iled.weight = scratch.rpsd.weight = 0.0
    out = build_objective(scratch, C, DS, DT, global_batch=B)(f_s, None, labels)
    assert set(out.terms) == {"sphereface2"} and out.cosine is None
    nothing = LossConfig()
    nothing.sphereface2.weight = nothing.iled.weight = nothing.rpsd.weight = 0.0
    with pytest.raises(ObjectiveInputError, match="no loss term"):
        build_objective(nothing, C, DS, DT, global_batch=B)


def test_projector_maps_student_to_teacher_dims():
    with pytest.raises(ObjectiveInputError, match=r"student embedding dim 4 \(model.embedding_dim\) differs from the teacher.s"):
        build_objective(LossConfig(), C, 4, DT, global_batch=B)
    objective = build_objective(LossConfig(), C, 4, DT, global_batch=B, projector=True)
    assert objective.projector.weight.shape == (DT, 4)
    assert any(p is objective.projector.weight for p in objective.replicated_parameters())
    f_s, f_t, labels = batch(ds=4)
    objective.update_bank(f_s.detach(), f_t)
    out = objective(f_s, f_t, labels)
    out.total.backward()
    assert objective.projector.weight.grad.abs().sum() > 0
    assert objective.head.weight.shape == (C, 4)  # the head sees the raw student embedding
    projected = F.normalize(f_s.detach() @ objective.projector.weight.detach().t(), dim=1)
    assert torch.allclose(objective.bank.filled_rows()[1], projected, atol=1e-6)


def test_parameter_groups_follow_the_head_mode():
    replicated = build_objective(LossConfig(), C, DS, DT, global_batch=B)
    assert {id(p) for p in replicated.replicated_parameters()} == {
        id(replicated.head.weight), id(replicated.head.bias)}
    assert replicated.sharded_parameters() == []
    cfg = LossConfig()
    cfg.sphereface2.parallel = "class_sharded"
    sharded = build_objective(cfg, C, DS, DT, global_batch=B)
    assert [id(p) for p in sharded.replicated_parameters()] == [id(sharded.head.bias)]
    assert [id(p) for p in sharded.sharded_parameters()] == [id(sharded.head.weight)]


@pytest.mark.parametrize("mutate, pattern", [
    (lambda s, t, y: (s, t, torch.tensor([0, 1, C, 2])),
     r"labels of shape \[4\] has values outside \[0, 11\)"),
    (lambda s, t, y: (s, t, torch.tensor([0, -1, 3, 2])),
     r"labels of shape \[4\] has values outside"),
    (lambda s, t, y: (s.detach().index_fill(0, torch.tensor([1]), float("nan")), t, y),
     r"f_s \(student embeddings\) of shape \[4, 6\] has NaN or Inf"),
    (lambda s, t, y: (s, t.index_fill(1, torch.tensor([2]), float("inf")), y),
     r"f_t \(teacher embeddings\) of shape \[4, 6\] has NaN or Inf"),
    (lambda s, t, y: (s, t[:, :5], y), r"f_t \(teacher embeddings\) has shape \[4, 5\]"),
    (lambda s, t, y: (s[:, :5], t, y), r"f_s \(student embeddings\) has shape \[4, 5\]"),
    (lambda s, t, y: (s, None, y), r"f_t \(teacher embeddings\) is None"),
    (lambda s, t, y: (s, t, y.float()), r"labels has shape \[4\] and dtype torch.float32"),
])
def test_bad_input_raises_one_line_naming_the_tensor(mutate, pattern):
    objective = build_objective(LossConfig(), C, DS, DT, global_batch=B)
    with pytest.raises(ObjectiveInputError, match=pattern) as info:
        objective(*mutate(*batch()))
    assert "\n" not in str(info.value)


def test_state_dict_round_trip_and_bank_resize_for_another_global_batch():
    torch.manual_seed(0)
    objective = build_objective(LossConfig(), C, DS, DT, global_batch=B)
    for step in range(4):
        objective.update_bank(*batch(step)[:2])
    buffer = io.BytesIO()
    torch.save(objective.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    torch.manual_seed(1)
    same = build_objective(LossConfig(), C, DS, DT, global_batch=B)
    same.load_state_dict(state)
    f_s, f_t, labels = batch(9)
    assert torch.equal(same(f_s, f_t, labels).total, objective(f_s, f_t, labels).total)
    smaller = build_objective(LossConfig(), C, DS, DT, global_batch=2)
    smaller.load_state_dict(state)
    assert smaller.bank.filled == 6
    newest = torch.argsort(objective.bank.stamp)[-6:]
    assert torch.equal(smaller.bank.teacher, objective.bank.teacher[newest])
    wrong = build_objective(LossConfig(), C + 1, DS, DT, global_batch=B)
    with pytest.raises(ObjectiveInputError, match=r"head.weight' has shape \[11, 6\]"):
        wrong.load_state_dict(state)


def enabled_kd_terms(cfg) -> set[str]:
    return {n for n in ("iled", "rpsd", "l2", "fc", "rkd") if getattr(cfg.loss, n).weight > 0}


def test_every_config_file_loads_and_builds_its_objective():
    specs = {p for p in CONFIGS.rglob("*.yaml") if "variants" in yaml.safe_load(p.read_text())}
    files = sorted(set(CONFIGS.rglob("*.yaml")) - specs)
    assert len(files) >= 8 and len(specs) >= 5
    for spec in specs:  # study specs: they name configs, and load them
        assert load_spec(spec).variants, spec
    for path in files:
        cfg = load_config(path)
        enabled = enabled_kd_terms(cfg)
        objective = build_objective(cfg.loss, 20, cfg.model.embedding_dim,
                                    cfg.teacher.embedding_dim, global_batch=8,
                                    projector=cfg.model.projector)
        assert set(objective.kd_terms) == enabled, path


@pytest.mark.parametrize("name, terms", [
    ("ablation/none", set()), ("ablation/iled", {"iled"}), ("ablation/rpsd", {"rpsd"}),
    ("ablation/unified", {"iled", "rpsd"}), ("baselines/fc", {"fc"}), ("baselines/l2", {"l2"}),
    ("baselines/rkd", {"rkd"}),
])
def test_ablation_and_baseline_configs_change_only_the_loss(name, terms):
    base = load_config(CONFIGS / "vggface2_r100_r18_unified.yaml")
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert enabled_kd_terms(cfg) == terms
    assert cfg.loss.sphereface2 == base.loss.sphereface2
    for section in ("model", "teacher", "data", "optim", "schedule", "precision"):
        assert getattr(cfg, section) == getattr(base, section), section


def test_state_of_another_term_set_is_refused_in_one_line():
    with_bank = build_objective(LossConfig(), C, DS, DT, global_batch=B)
    cfg = LossConfig()
    cfg.rpsd.weight = 0.0
    without_bank = build_objective(cfg, C, DS, DT, global_batch=B)
    unexpected = r"unexpected keys \['kd_terms.rpsd.bank.teacher'"
    with pytest.raises(ObjectiveInputError, match=unexpected) as info:
        without_bank.load_state_dict(with_bank.state_dict())
    assert "\n" not in str(info.value)
    with pytest.raises(ObjectiveInputError, match=r"missing keys \['kd_terms.rpsd.bank.teacher'"):
        with_bank.load_state_dict(without_bank.state_dict())
    without_bank.load_state_dict(with_bank.state_dict(), strict=False)
