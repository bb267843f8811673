"""2-rank checks of the objective against the 1-rank computation on the same global batches.

Launched by tests/scenarios/test_loss_distributed.py under torchrun (gloo, CPU). Every rank
first runs the 1-rank reference on the whole global batch (before the process group exists,
so the objective's collectives are no-ops), then joins the group and runs the same training
steps on its contiguous slice, applying the trainer's gradient contract: DDP's average of
the student gradients (done here with dist.average_gradients on a small linear "student"),
average_gradients(objective.replicated_parameters()), sharded rows left alone. Runs:

* replicated head, FIFO bank, student_bank anchor;
* class-sharded head, FIFO bank (same reference as the replicated head);
* replicated head, random bank updates, teacher_bank anchor, no distance weighting;
* replicated head, FIFO bank, ema_student_bank anchor (the bank's student rows from an EMA
  copy of the student) and every distillation weight balanced (METHOD E7) from the
  diagnostics of every step.

Every run enables all terms (SphereFace2, ILED, RPSD, l2, fc, RKD) and a projector (student
dim != teacher dim). The worker writes the relative differences to OUT/result.json (per
quantity and step; the first step starts from identical states, later ones carry the float32
drift of the SGD updates; the per-term diagnostics of METHOD D1 are global values, compared
as they are) and, from rank 0, the final class-sharded state to
OUT/sharded_state.pt and the reference's to OUT/reference_state.pt; the test asserts on them.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from fr_distill import dist
from fr_distill.config import LossConfig
from fr_distill.losses import build_objective

STEPS, WORLD, LOCAL_BATCH = 4, 2, 3
GLOBAL_BATCH = WORLD * LOCAL_BATCH
NUM_CLASSES, IN_DIM, STUDENT_DIM, TEACHER_DIM = 7, 6, 5, 4
LR = 0.01


def loss_config(parallel: str, update: str, anchor: str, weighting: bool,
                balanced: bool = False) -> LossConfig:
    cfg = LossConfig()
    cfg.sphereface2.parallel = parallel
    cfg.bank.bank_factor, cfg.bank.update, cfg.bank.seed = 2, update, 5
    cfg.rpsd.student_anchor, cfg.rpsd.ema_momentum = anchor, 0.9
    cfg.iled.distance_weighting = weighting
    cfg.l2.weight, cfg.fc.weight, cfg.rkd.weight = 0.5, 1.0, 1.0
    if balanced:
        b = cfg.balance
        b.enabled, b.iled, b.rpsd, b.l2, b.fc, b.rkd = True, 0.3, 0.5, 0.2, 0.1, 0.05
    return cfg


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(GLOBAL_BATCH, IN_DIM, generator=g),
             torch.randn(GLOBAL_BATCH, TEACHER_DIM, generator=g),
             torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,), generator=g)) for _ in range(STEPS)]


def build(cfg: LossConfig):
    torch.manual_seed(1)
    student = nn.Linear(IN_DIM, STUDENT_DIM)
    torch.manual_seed(0)
    objective = build_objective(cfg, NUM_CLASSES, STUDENT_DIM, TEACHER_DIM, GLOBAL_BATCH,
                                projector=True, student=student)
    return objective, student


def full_head_tensor(objective, tensor: torch.Tensor) -> torch.Tensor:
    """A head-weight-shaped tensor over all classes (gathered when the head is sharded)."""
    return dist.all_gather_rows(tensor) if objective.head.class_sharded else tensor.clone()


def train(objective, student, batches, rows: slice) -> dict:
    """STEPS steps of SGD; records, per step, every value and gradient to compare."""
    params = list(student.parameters()) + list(objective.parameters())
    optimizer = torch.optim.SGD(params, lr=LR)
    record: dict[str, list] = {}

    def keep(name: str, value: torch.Tensor) -> None:
        record.setdefault(name, []).append(value.detach().clone())

    keep("head_weight", full_head_tensor(objective, objective.head.weight))
    keep("projector", objective.projector.weight)
    for x, f_t, labels in batches:
        x, f_t, labels = x[rows], f_t[rows], labels[rows]
        f_s = student(x)
        f_s.retain_grad()
        out = objective(f_s, f_t, labels)
        diagnostics = objective.diagnostics(out, f_s)
        for name, value in diagnostics.items():  # global values (D1)
            keep("diag/" + name, value)
        optimizer.zero_grad()
        out.total.backward()
        dist.average_gradients(student.parameters())  # what DDP does for the student
        dist.average_gradients(objective.replicated_parameters())
        for name, value in out.terms.items():
            keep("term/" + name, dist.all_reduce_sum(value) / dist.world_size())
        keep("total", dist.all_reduce_sum(out.total.detach()) / dist.world_size())
        keep("cosine", dist.all_reduce_sum(out.cosine) / dist.world_size())
        keep("grad/features", f_s.grad)
        keep("grad/student_weight", student.weight.grad)
        keep("grad/student_bias", student.bias.grad)
        keep("grad/head_weight", full_head_tensor(objective, objective.head.weight.grad))
        keep("grad/head_bias", objective.head.bias.grad)
        keep("grad/projector", objective.projector.weight.grad)
        optimizer.step()
        ema = objective.ema_embeddings(student, [x])  # None but with ema_student_bank
        objective.update_bank(f_s.detach(), f_t, None if ema is None else ema[0])
        for name, value in objective.balance(diagnostics).items():  # METHOD E7
            keep(name, value)
        keep("bank/teacher", objective.bank.teacher)
        keep("bank/student", objective.bank.student)
        keep("bank/stamp", objective.bank.stamp.double())
    keep("head_weight", full_head_tensor(objective, objective.head.weight))
    return record


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / max(1.0, b.double().abs().max()))


def compare(record: dict, reference: dict, rows: slice) -> dict[str, list[float]]:
    """Per quantity, the relative difference at each recorded step."""
    diffs = {}
    for name, values in record.items():
        expected = reference[name]
        if name == "grad/features":  # per-rank feature gradients are W × the 1-rank rows
            expected = [WORLD * v[rows] for v in expected]
        diffs[name] = [relative_difference(a, b) for a, b in zip(values, expected)]
    return diffs


def main(out_dir: str) -> None:
    out = Path(out_dir)
    batches = global_batches()
    runs = {
        "replicated": loss_config("replicated", "fifo", "student_bank", True),
        "class_sharded": loss_config("class_sharded", "fifo", "student_bank", True),
        "random_teacher_bank": loss_config("replicated", "random", "teacher_bank", False),
        "balanced_ema": loss_config("replicated", "fifo", "ema_student_bank", True, True),
    }
    reference_of = {"replicated": "fifo", "class_sharded": "fifo", "random_teacher_bank": "random",
                    "balanced_ema": "balanced_ema"}
    reference_objective, reference_student = build(runs["replicated"])
    references = {"fifo": train(reference_objective, reference_student, batches, slice(None)),
                  "random": train(*build(runs["random_teacher_bank"]), batches, slice(None)),
                  "balanced_ema": train(*build(runs["balanced_ema"]), batches, slice(None))}

    info = dist.init(backend="gloo", device="cpu")
    assert info.world_size == WORLD, info
    rows = slice(info.rank * LOCAL_BATCH, (info.rank + 1) * LOCAL_BATCH)
    result: dict = {"diffs": {}, "rank_mismatch": {}, "init_mismatch": {},
                    "reference_rpsd": [float(v) for v in references["fifo"]["term/rpsd"]],
                    "reference_balance": {k: [float(v) for v in values] for k, values
                                          in references["balanced_ema"].items()
                                          if k.startswith("balance/")}}
    sharded_objective = None
    for name, cfg in runs.items():
        objective, student = build(cfg)
        record = train(objective, student, batches, rows)
        result["diffs"][name] = compare(record, references[reference_of[name]], rows)
        final = {key: record[key][-1] for key in ("bank/teacher", "bank/student", "bank/stamp",
                                                  "head_weight")}
        if objective.balancer is not None:
            final["balance_weights"] = objective.balancer.weights
        if objective.ema_student is not None:
            final["ema_student"] = objective.ema_student.encoder.weight
        gathered = {key: dist.all_gather_cat(v.detach().unsqueeze(0)) for key, v in final.items()}
        result["rank_mismatch"][name] = {key: float((v[0] - v[1]).abs().max())
                                         for key, v in gathered.items()}
        if name == "class_sharded":
            sharded_objective = objective
    for name, cfg in runs.items():  # ranks with different RNG states still start identical
        torch.manual_seed(100 + info.rank)
        objective = build_objective(cfg, NUM_CLASSES, STUDENT_DIM, TEACHER_DIM, GLOBAL_BATCH,
                                    projector=True, student=nn.Linear(IN_DIM, STUDENT_DIM))
        start = {"projector": objective.projector.weight,
                 "head_weight": full_head_tensor(objective, objective.head.weight)}
        gathered = {key: dist.all_gather_cat(v.detach().unsqueeze(0)) for key, v in start.items()}
        result["init_mismatch"][name] = {key: float((v[0] - v[1]).abs().max())
                                         for key, v in gathered.items()}
    state = sharded_objective.state_dict()  # a collective: gathers the class rows
    assert state["head.weight"].shape == (NUM_CLASSES, STUDENT_DIM)
    resharded, _ = build(runs["class_sharded"])
    resharded.load_state_dict(copy.deepcopy(state))
    result["reshard_rows_exact"] = torch.equal(resharded.head.weight, sharded_objective.head.weight)
    all_results = dist.all_gather_object(result)
    if info.is_main:
        torch.save(state, out / "sharded_state.pt")
        torch.save(reference_objective.state_dict(), out / "reference_state.pt")
        (out / "result.json").write_text(json.dumps(all_results, indent=1))
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
