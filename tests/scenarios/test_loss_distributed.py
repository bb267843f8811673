"""The objective under torchrun --nproc_per_node 2 (gloo, CPU) against the 1-rank computation
on the same global batches: every term, every gradient under the trainer's gradient contract,
the shared bank, and class-sharded checkpoints resumed in one process (METHOD E1–E6)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fr_distill.config import LossConfig
from fr_distill.losses import build_objective

WORKER = Path(__file__).parents[1] / "workers" / "worker_losses_2rank.py"
RUNS = ("replicated", "class_sharded", "random_teacher_bank", "balanced_ema")


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    from conftest import run_torchrun

    out = tmp_path_factory.mktemp("losses_2rank")
    run_torchrun(WORKER, str(out), nproc=2, timeout=300)
    return out, json.loads((out / "result.json").read_text())


@pytest.mark.dist
@pytest.mark.parametrize("run", RUNS)
def test_two_ranks_equal_one_rank(two_rank_run, run):
    _, results = two_rank_run
    for rank, result in enumerate(results):
        diffs = result["diffs"][run]
        terms = ("sphereface2", "iled", "rpsd", "l2", "fc", "rkd")
        expected = {"term/" + t for t in terms} | {f"diag/grad_norm/{t}" for t in terms} | {
            "diag/iled/below_target", "diag/rpsd/above_tolerance", "diag/rpsd/mean_gap"}
        assert expected <= set(diffs) and len(diffs["term/rpsd"]) == 4
        rpsd = result["reference_rpsd"]  # empty bank at the first step, then filled
        assert rpsd[0] == 0.0 and min(rpsd[1:]) > 1e-3
        for name, per_step in diffs.items():
            # The first step starts from identical states: everything agrees to float32 rounding.
            assert per_step[0] <= 1e-6, (rank, run, name, per_step)
            # Later steps carry the float32 drift of the SGD updates, which depends on the
            # order in which the machine's kernels sum: values and the bank stay within 5e-6
            # (RKD's drifted by 1.1e-6 on an AMD EPYC); gradients of the steep softplus terms
            # and of RKD (and their norms and shares, METHOD D1) amplify it, so they get 5e-5
            # (RKD's norm: 1.1e-5); so do the balanced weights (METHOD E7), set from those
            # norms, and, in that run, everything they weight.
            limit = 5e-5 if name.startswith(("grad/", "diag/grad_", "balance/")) else 5e-6
            if run == "balanced_ema":
                limit = 5e-5
            assert max(per_step) <= limit, (rank, run, name, per_step)
    if run == "balanced_ema":  # the balanced weights were compared at every step, and moved
        diffs, trace = results[0]["diffs"][run], results[0]["reference_balance"]
        assert {f"balance/{t}" for t in terms[1:]} | {"balance/held"} <= set(diffs)
        assert trace["balance/held"] == [0.0] * 4
        start = {"iled": 7.0, "l2": 0.5, "fc": 1.0, "rkd": 1.0}  # RPSD's bank is empty at first
        for term, weight in start.items():
            assert all(abs(value / weight - 1) > 1e-3 for value in trace[f"balance/{term}"]), term
        assert trace["balance/rpsd"][0] == 40.0 and trace["balance/rpsd"][-1] != 40.0


@pytest.mark.dist
@pytest.mark.parametrize("run", RUNS)
def test_bank_and_head_identical_on_both_ranks(two_rank_run, run):
    _, results = two_rank_run
    mismatch = results[0]["rank_mismatch"][run]
    extra = {"balance_weights", "ema_student"} if run == "balanced_ema" else set()
    assert set(mismatch) == {"bank/teacher", "bank/student", "bank/stamp", "head_weight"} | extra
    assert all(value == 0.0 for value in mismatch.values()), mismatch


@pytest.mark.dist
@pytest.mark.parametrize("run", RUNS)
def test_objective_starts_identical_on_ranks_with_different_rng_states(two_rank_run, run):
    _, results = two_rank_run
    mismatch = results[0]["init_mismatch"][run]
    assert set(mismatch) == {"projector", "head_weight"}
    assert all(value == 0.0 for value in mismatch.values()), mismatch


@pytest.mark.dist
def test_class_sharded_checkpoint_resumes_on_one_rank_with_another_global_batch(two_rank_run):
    out, results = two_rank_run
    assert all(result["reshard_rows_exact"] for result in results)
    state = torch.load(out / "sharded_state.pt", weights_only=True)
    reference = torch.load(out / "reference_state.pt", weights_only=True)
    torch.testing.assert_close(state["head.weight"], reference["head.weight"], rtol=0, atol=1e-6)
    cfg = LossConfig()
    cfg.sphereface2.parallel = "class_sharded"
    cfg.bank.bank_factor = 2
    single = build_objective(cfg, 7, 5, 4, global_batch=4, projector=True)  # bank 12 -> 8 rows
    single.load_state_dict(state)
    torch.testing.assert_close(single.head.weight.detach(), reference["head.weight"],
                               rtol=0, atol=1e-6)
    stamps = reference["kd_terms.rpsd.bank.stamp"]
    newest = torch.argsort(stamps)[-8:]
    assert single.bank.filled == 8 and single.bank.stamp.tolist() == stamps[newest].tolist()
    torch.testing.assert_close(single.bank.teacher, reference["kd_terms.rpsd.bank.teacher"][newest],
                               rtol=0, atol=1e-6)
