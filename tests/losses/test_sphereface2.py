"""SphereFace2-C head, METHOD (E1): bias initialization, loss and gradients against a literal
float64 evaluation of the formula, gradcheck, in-place row normalization, class split."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fr_distill.losses import ObjectiveInputError
from fr_distill.losses import sphereface2 as sf2
from fr_distill.losses.sphereface2 import (SphereFace2Head, class_range, initial_bias,
                                           initial_weight_rows, margin_offsets, sphereface2_sum)

PARAMS = dict(lamb=0.7, r=40.0, m=0.4, t=3.0, lw=10.0)

# 3 samples, 4 dims, 5 classes, written out by hand.
FEATURES = torch.tensor([[0.9, -0.2, 0.4, 0.1],
                         [-0.3, 0.8, 0.5, -0.6],
                         [0.2, 0.1, -0.7, 0.9]], dtype=torch.float64)
WEIGHT = torch.tensor([[1.0, 0.5, -0.2, 0.3],
                       [-0.4, 1.2, 0.1, 0.0],
                       [0.3, -0.3, -1.1, 0.6],
                       [0.0, 0.2, 0.4, -0.9],
                       [0.7, 0.7, 0.7, 0.7]], dtype=torch.float64)
LABELS = torch.tensor([0, 3, 2])


def literal_e1(features, weight_hat, bias, labels, lamb, r, m, t, lw):
    """E1 exactly as METHOD writes it: one-hot y, g with the margin, stop-gradient offset,
    per-entry weights, weighted BCE-with-logits averaged over all B·C entries (the reduction
    OpenSphere's SphereFace2-C uses), cross-checked against log(1 + e^x) − y·x."""
    num_classes = weight_hat.shape[0]
    cos = (features / features.norm(dim=1, keepdim=True)) @ weight_hat.t()
    y = torch.zeros_like(cos)
    y[torch.arange(len(labels)), labels] = 1.0
    g = 2.0 * ((cos + 1.0) / 2.0) ** t - 1.0 - m * (2.0 * y - 1.0)
    logit = r * (cos + (g - cos).detach()) + bias
    w = lw * num_classes / r * (lamb * y + (1.0 - lamb) * (1.0 - y))
    loss = F.binary_cross_entropy_with_logits(logit, y, weight=w)
    by_hand = (w * (torch.log1p(torch.exp(logit)) - y * logit)).mean()
    assert abs(loss.item() - by_hand.item()) <= 1e-12 * abs(by_hand.item())
    return loss


def float64_head(weight=WEIGHT, **params) -> SphereFace2Head:
    head = SphereFace2Head(weight.shape[0], weight.shape[1], **{**PARAMS, **params}).double()
    with torch.no_grad():
        head.weight.copy_(weight)
    return head


def test_bias_initialization_is_the_closed_form():
    for num_classes, (lamb, r, m, t) in [(8631, (0.7, 40.0, 0.4, 3.0)), (5, (0.5, 30.0, 0.2, 2.0))]:
        z = lamb / ((1 - lamb) * (num_classes - 1))
        a_y, a_i = r * (2 * 0.5 ** t - 1 - m), r * (2 * 0.5 ** t - 1 + m)
        expected = (math.log(2 * z) - a_i
                    - math.log(1 - z + math.sqrt((1 - z) ** 2 + 4 * z * math.exp(a_y - a_i))))
        assert initial_bias(num_classes, lamb, r, m, t) == pytest.approx(expected, rel=1e-15)
        head = SphereFace2Head(num_classes, 8, lamb=lamb, r=r, m=m, t=t, lw=10.0)
        assert head.bias.item() == pytest.approx(expected, rel=1e-6)


def test_initial_bias_balances_positive_and_negative_terms_at_zero_cosine():
    # What the closed form solves: with every cosine 0, d(loss)/db = 0.
    head = float64_head(weight=torch.eye(4, 6, dtype=torch.float64))
    with torch.no_grad():
        head.bias.fill_(initial_bias(4, **{k: PARAMS[k] for k in ("lamb", "r", "m", "t")}))
    features = torch.tensor([[0, 0, 0, 0, 1.0, 0.5], [0, 0, 0, 0, -0.3, 2.0]], dtype=torch.float64)
    head(features, torch.tensor([1, 3])).backward()
    assert abs(head.bias.grad.item()) < 1e-9


def test_loss_and_gradients_equal_the_literal_formula():
    head = float64_head()
    features = FEATURES.clone().requires_grad_()
    loss = head(features, LABELS)
    loss.backward()

    weight_hat = (WEIGHT / WEIGHT.norm(dim=1, keepdim=True)).requires_grad_()
    bias = torch.tensor(head.bias.item(), dtype=torch.float64, requires_grad=True)
    features_ref = FEATURES.clone().requires_grad_()
    expected = literal_e1(features_ref, weight_hat, bias, LABELS, **PARAMS)
    expected.backward()

    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(features.grad, features_ref.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(head.weight.grad, weight_hat.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(head.bias.grad.reshape(()), bias.grad, rtol=1e-9, atol=1e-9)


def test_float32_head_matches_float64_formula():
    head = SphereFace2Head(5, 4, **PARAMS)
    with torch.no_grad():
        head.weight.copy_(WEIGHT.float())
    loss = head(FEATURES.float(), LABELS)
    weight_hat = WEIGHT / WEIGHT.norm(dim=1, keepdim=True)
    expected = literal_e1(FEATURES, weight_hat, torch.tensor(head.bias.item(), dtype=torch.float64),
                          LABELS, **PARAMS)
    assert loss.item() == pytest.approx(expected.item(), rel=2e-6)


def test_rows_are_normalized_in_place_without_gradient():
    head = float64_head()
    head(FEATURES, LABELS)
    torch.testing.assert_close(head.weight.detach().norm(dim=1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(head.weight.detach(), WEIGHT / WEIGHT.norm(dim=1, keepdim=True))


def test_gradcheck_with_the_margin_offset_held_fixed():
    # E1's gradient flows as r·cos: sg[g − cos] is a constant of the step, so the function
    # checked numerically is the loss with that offset frozen at the evaluation point.
    weight_hat = WEIGHT / WEIGHT.norm(dim=1, keepdim=True)
    cos0 = F.normalize(FEATURES, dim=1) @ weight_hat.t()
    offsets = margin_offsets(cos0, LABELS, PARAMS["m"], PARAMS["t"])
    bias0 = torch.tensor([initial_bias(5, 0.7, 40.0, 0.4, 3.0)], dtype=torch.float64)

    def loss(features, weight, bias):
        cos = F.normalize(features, dim=1) @ weight.t()
        total = sphereface2_sum(cos, LABELS, bias, offsets, num_classes=5, lamb=0.7, r=40.0,
                                lw=10.0)
        return total / cos.numel()

    inputs = (FEATURES.clone().requires_grad_(), weight_hat.clone().requires_grad_(),
              bias0.requires_grad_())
    assert torch.autograd.gradcheck(loss, inputs)


def test_class_blocks_sum_to_the_whole_loss():
    # The class-parallel form: blocks of columns (one empty) add up to the unsplit sum.
    weight_hat = WEIGHT / WEIGHT.norm(dim=1, keepdim=True)
    cos = F.normalize(FEATURES, dim=1) @ weight_hat.t()
    bias = torch.tensor([-3.0], dtype=torch.float64)
    kwargs = dict(num_classes=5, lamb=0.7, r=40.0, lw=10.0)
    whole = sphereface2_sum(cos, LABELS, bias, margin_offsets(cos, LABELS, 0.4, 3.0), **kwargs)
    parts = 0.0
    for start, end in [(0, 2), (2, 2), (2, 5)]:
        block = cos[:, start:end]
        inside = (LABELS >= start) & (LABELS < end)
        col = torch.where(inside, LABELS - start, -1)
        offsets = margin_offsets(block, col, 0.4, 3.0)
        parts = parts + sphereface2_sum(block, col, bias, offsets, **kwargs)
    assert parts.item() == pytest.approx(whole.item(), rel=1e-13)


def test_class_range_splits_evenly_and_contiguously():
    assert [class_range(7, 2, k) for k in range(2)] == [(0, 4), (4, 7)]
    assert [class_range(5, 3, k) for k in range(3)] == [(0, 2), (2, 4), (4, 5)]
    assert [class_range(2, 3, k) for k in range(3)] == [(0, 1), (1, 2), (2, 2)]


def test_initial_rows_are_the_same_matrix_for_any_split(monkeypatch):
    monkeypatch.setattr(sf2, "INIT_BLOCK_ROWS", 4)
    full = initial_weight_rows(10, 3, 0, 10, seed=123)
    for world in (2, 3):
        shards = [initial_weight_rows(10, 3, *class_range(10, world, k), seed=123)
                  for k in range(world)]
        assert torch.equal(torch.cat(shards), full)
    assert not torch.equal(initial_weight_rows(10, 3, 0, 10, seed=124), full)


def test_state_dict_holds_the_full_matrix_and_rejects_another_shape():
    head = float64_head()
    state = head.state_dict()
    assert state["weight"].shape == (5, 4)
    other = float64_head(weight=torch.ones(5, 4, dtype=torch.float64))
    other.load_state_dict(state)
    assert torch.equal(other.weight, head.weight)
    wrong = SphereFace2Head(6, 4, **PARAMS)
    with pytest.raises(ObjectiveInputError, match=r"head is \[6, 4\]"):
        wrong.load_state_dict(state)
