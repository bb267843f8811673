"""The communication model of a training step (benchmarks.comm) against the
collectives the trainer's step really makes, counted under torchrun (gloo, CPU)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks import comm

MODULE = Path(comm.__file__)
#: One torchrun launch. Three ranks rather than two: a W-dependent term cannot pass by
#: coincidence (4·W·B·D against a constant), and C = 10 splits unevenly (4, 3, 3).
#: ``tools/benchmark.py comm`` counts W = 1, 2, 3.
WORLD = 3


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    from conftest import run_torchrun

    out = tmp_path_factory.mktemp("comm")
    run_torchrun(MODULE, "--worker", str(out), nproc=WORLD, timeout=300)
    return WORLD, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.dist
def test_counted_payload_equals_model_per_term(counted):
    world, ranks = counted
    for name in comm.SCENARIOS:
        for window in comm.COUNTED_STEPS:
            first = ranks[0]["scenarios"][name]
            seen = first["windows"][window]
            assert all(r["scenarios"][name]["windows"][window] == seen for r in ranks)
            rows = comm.compare(comm.window_shape(first["shape"], window), seen)
            assert not [r for r in rows if r["term"].startswith("unmodeled")], rows
            for row in rows:
                assert (row["bytes"], row["calls"]) == (row["predicted_bytes"],
                                                        row["predicted_calls"]), (name, window, row)


@pytest.mark.dist
def test_counted_payload_hand_computed(counted):
    """Some terms by hand: B = 4, C = 10, D = 32 (paper scenario: Dt = 32; sharded: Dt = 48,
    2 micro-steps, RKD, projector)."""
    world, ranks = counted
    paper = {r["term"]: r["bytes"] for r in comm.compare(
        comm.window_shape(ranks[0]["scenarios"]["paper"]["shape"], "logging_step"),
        ranks[0]["scenarios"]["paper"]["windows"]["logging_step"])}
    assert paper["replicated_grads"] == 4 * (10 * 32 + 1)       # head weight and bias
    assert paper["iled_normalizer"] == 8                         # (sum, count)
    assert paper["nonfinite_flags"] == 4 * 7                     # f_s, f_t, 3 terms, total, stop
    assert paper["bank"] == 4 * 4 * 2 * 32                       # B rows of teacher + student
    assert paper["diagnostics"] == 4 * (2 * 3 + 2 * 3)           # 3 terms, 3 mining statistics
    assert paper["logging"] == 4 * 6                             # 3 terms, total, cosine, wait
    shape = ranks[0]["scenarios"]["sharded"]["shape"]
    student = sum(p.numel() for p in comm_student().parameters() if p.requires_grad)
    assert shape["params"] == student
    sharded = {r["term"]: r["bytes"] for r in comm.compare(
        comm.window_shape(shape, "step"), ranks[0]["scenarios"]["sharded"]["windows"]["step"])}
    assert sharded["ddp_gradients"] == 4 * student
    assert sharded["head_features"] == 2 * 4 * 4 * 32
    assert sharded["head_labels"] == 2 * 8 * 4
    assert sharded["feature_grads"] == 2 * 4 * world * 4 * (32 + 48)  # head and RKD gathers
    assert sharded["replicated_grads"] == 4 * (1 + 32 * 48)          # bias, projector
    assert sharded["bank"] == 2 * 4 * 4 * 2 * 48


def comm_student() -> torch.nn.Module:
    from fr_distill.models import get_backbone

    return get_backbone("iresnet18", comm.TINY["dim"], width=comm.TINY["width"])


def test_wire_bytes_of_the_ring_algorithms():
    assert comm.wire_bytes("all_reduce", 1000, 4) == 1500       # 2(W-1)/W
    assert comm.wire_bytes("all_gather", 1000, 4) == 3000       # (W-1) parts
    assert comm.wire_bytes("reduce_scatter_tensor", 1000, 4) == 750
    assert comm.wire_bytes("_broadcast_coalesced", 1000, 4) == 1000
    assert comm.wire_bytes("all_reduce", 1000, 1) == 0


def test_model_of_the_paper_pair_at_512_gpus():
    """NCCL, B = 64, D = 512: the class-sharded head's gather and reduce-scatter and the bank's
    gather grow with W; the replicated head's all-reduce does not, but carries C·D."""
    base = comm.StepShape(world=512, batch=64, classes=2059906, dim=512, teacher_dim=512,
                          params=24025600, buffer_bytes=59128, head="class_sharded")
    sharded = comm.predict(base)
    assert sharded["head_features"].nbytes == 4 * 64 * 512
    assert comm.wire_bytes("all_gather", sharded["head_features"].nbytes, 512) == 511 * 131072
    assert sharded["feature_grads"].kind == "reduce_scatter_tensor"
    assert sharded["feature_grads"].nbytes == 4 * 512 * 64 * 512
    assert sharded["bank"].nbytes == 4 * 64 * 1024
    assert sharded["replicated_grads"].nbytes == 4
    replicated = comm.predict(replace(base, head="replicated"))
    assert replicated["replicated_grads"].nbytes == 4 * (2059906 * 512 + 1)
    assert "head_features" not in replicated and "feature_grads" not in replicated
