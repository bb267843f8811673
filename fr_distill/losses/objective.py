"""The unified distillation objective: METHOD (E5), a weighted sum of terms built from config.

``L = λ_FR·L_FR + λ_ILED·L_ILED + λ_RPSD·L_RPSD + Σ_k λ_k·L_k`` over the terms whose weight
is > 0 (an ablation or a baseline is a config, not a code path). Every term is computed in
float32 with autocast disabled, and returned separately for logging.

Per-rank values: each term's value on a rank is its share such that the **average over
ranks equals the 1-rank value on the global batch**; gradients follow the contract of the
trainer (DDP averages the student's gradients, :meth:`Objective.replicated_parameters` are
averaged with ``dist.average_gradients``, :meth:`Objective.sharded_parameters` are not), under
which every gradient equals the 1-rank gradient. All ranks must pass the same batch size.
To log the 1-rank value of a term, average it over ranks (``dist.all_reduce_sum(v) / W``).

Checkpoints: ``state_dict()`` holds the head (always the full ``[C, D]`` matrix), the
projector and the bank; with a class-sharded head it is a collective (the rows are
gathered), so every rank must call it; ``sharded_state_dict()`` holds this rank's rows
instead, for a sharded checkpoint. ``load_state_dict`` re-shards the head for the
current world size and resizes the bank for the current global batch.

Input checks: shapes and dtypes are checked on the host; finiteness of the embeddings and
the label range are reduced to one small flag vector read with a single device sync per
call, since an out-of-range label would otherwise be a device-side assert, not an error.
The trainer, which reads one value per optimizer step, calls ``forward(...,
check_values=False)``: its loader checks labels on the host, and it detects non-finite
values itself (:mod:`fr_distill.engine.step`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fr_distill import dist
from fr_distill.config import LossConfig
from fr_distill.losses.balance import TermBalancer
from fr_distill.losses.baselines import FeatureConsistency, L2Distillation, RelationalKD
from fr_distill.losses.diagnostics import term_diagnostics
from fr_distill.losses.ema_student import EMAStudent
from fr_distill.losses.errors import ObjectiveInputError, shape_of
from fr_distill.losses.iled import ILED
from fr_distill.losses.kd_inputs import KDInputs
from fr_distill.losses.memory_bank import MemoryBank
from fr_distill.losses.rpsd import RPSD
from fr_distill.losses.sphereface2 import SphereFace2Head


@dataclass
class ObjectiveOutput:
    """``total`` to backward; ``terms``: unweighted, detached values of the enabled terms;
    ``cosine``: detached mean student–teacher cosine of this batch (None without teacher);
    ``weighted``: ``λ_k·L_k`` of each term, with its graph, and ``inputs``: the distillation
    terms' inputs (None without them), both kept for :meth:`Objective.diagnostics`."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    cosine: torch.Tensor | None
    weighted: dict[str, torch.Tensor]
    inputs: KDInputs | None


class Objective(nn.Module):
    """METHOD (E5): the SphereFace2 head (E1), the distillation terms (E2, E4, E6), the shared
    memory bank (E3), the optional linear student→teacher projector, the optional adaptive
    weights of the distillation terms (E7) and the EMA student of ``ema_student_bank`` (E4)."""

    def __init__(self, num_classes: int, student_dim: int, teacher_dim: int,
                 head: SphereFace2Head | None, head_weight: float,
                 kd_terms: dict[str, tuple[nn.Module, float]], projector: nn.Linear | None,
                 balancer: TermBalancer | None = None, ema_student: EMAStudent | None = None) -> None:
        super().__init__()
        self.num_classes, self.student_dim, self.teacher_dim = num_classes, student_dim, teacher_dim
        self.head = head
        self.head_weight = head_weight
        self.kd_terms = nn.ModuleDict({name: term for name, (term, _) in kd_terms.items()})
        self.kd_weights = {name: weight for name, (_, weight) in kd_terms.items()}
        self.projector = projector
        self.balancer = balancer
        self.ema_student = ema_student

    def term_weight(self, name: str) -> float | torch.Tensor:
        """``λ_k`` of distillation term ``name``: its configured weight, or its balanced one (E7)
        as a device tensor."""
        if self.balancer is not None and name in self.balancer.names:
            return self.balancer.weight(name)
        return self.kd_weights[name]

    @property
    def needs_teacher(self) -> bool:
        """Whether any distillation term is enabled (``forward`` then needs ``f_t``)."""
        return len(self.kd_terms) > 0

    @property
    def bank(self) -> MemoryBank | None:
        """The shared memory bank (E3), present when RPSD is enabled."""
        return self.kd_terms["rpsd"].bank if "rpsd" in self.kd_terms else None

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Parameters every rank holds whole: gradients are averaged over ranks."""
        params = list(self.projector.parameters()) if self.projector is not None else []
        if self.head is not None:
            params.append(self.head.bias)
            if not self.head.class_sharded:
                params.append(self.head.weight)
        return params

    def sharded_parameters(self) -> list[nn.Parameter]:
        """This rank's class rows of a class-sharded head: gradients are not averaged."""
        return [self.head.weight] if self.head is not None and self.head.class_sharded else []

    # -- checkpoint state ------------------------------------------------------------------------
    def sharded_state_dict(self) -> dict:
        """``state_dict()`` without gathering: a class-sharded head's weight is this rank's rows,
        tagged with their place in the ``[C, D]`` matrix (for a sharded checkpoint)."""
        if self.head is None:
            return self.state_dict()
        self.head.gather_on_save = False
        try:
            return self.state_dict()
        finally:
            self.head.gather_on_save = True

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load head, projector and bank (resized or re-sharded as needed, see their modules).

        With ``strict``, keys missing from the state or not used by this objective (a term
        enabled in one config and not the other) raise a one-line :class:`ObjectiveInputError`.
        ``state_dict()`` of a class-sharded head is a collective: call it on every rank.
        """
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if strict and (result.missing_keys or result.unexpected_keys):
            raise ObjectiveInputError(
                f"objective state does not match this objective: missing keys "
                f"{list(result.missing_keys)}, unexpected keys {list(result.unexpected_keys)}")
        return result

    # -- input checks ----------------------------------------------------------------------------
    def _check_embeddings(self, f_s: torch.Tensor, f_t: torch.Tensor | None) -> None:
        if f_s.dim() != 2 or f_s.shape[1] != self.student_dim or not f_s.is_floating_point():
            raise ObjectiveInputError(f"f_s (student embeddings) has shape {shape_of(f_s)} and "
                                      f"dtype {f_s.dtype}; expected float [B, {self.student_dim}]")
        batch = f_s.shape[0]
        if batch == 0:
            raise ObjectiveInputError("f_s (student embeddings) has shape [0, ...]: empty batch")
        if f_t is None and self.needs_teacher:
            raise ObjectiveInputError(f"f_t (teacher embeddings) is None but distillation terms "
                                      f"{', '.join(self.kd_terms)} are enabled")
        if f_t is not None and (f_t.dim() != 2 or tuple(f_t.shape) != (batch, self.teacher_dim)
                                or not f_t.is_floating_point()):
            raise ObjectiveInputError(f"f_t (teacher embeddings) has shape {shape_of(f_t)} and "
                                      f"dtype {f_t.dtype}; expected float "
                                      f"[{batch}, {self.teacher_dim}]")

    def _check_shapes(self, f_s: torch.Tensor, f_t: torch.Tensor | None,
                      labels: torch.Tensor) -> None:
        """Shapes and dtypes of the embeddings and labels, on the host (no device sync)."""
        self._check_embeddings(f_s, f_t)
        batch = f_s.shape[0]
        if self.head is not None and (labels.dim() != 1 or labels.shape[0] != batch
                                      or labels.is_floating_point() or labels.dtype == torch.bool):
            raise ObjectiveInputError(f"labels has shape {shape_of(labels)} and dtype "
                                      f"{labels.dtype}; expected integer [{batch}]")

    def _check_inputs(self, f_s: torch.Tensor, f_t: torch.Tensor | None,
                      labels: torch.Tensor) -> None:
        """:meth:`_check_shapes`, then one device sync for finiteness of ``f_s``/``f_t`` and
        ``0 <= labels < C``, reduced to a single small flag vector."""
        self._check_shapes(f_s, f_t, labels)
        checks = [("f_s (student embeddings)", f_s, torch.isfinite(f_s).all(), "NaN or Inf values")]
        if f_t is not None:
            checks.append(("f_t (teacher embeddings)", f_t, torch.isfinite(f_t).all(),
                           "NaN or Inf values"))
        if self.head is not None:
            checks.append(("labels", labels, ((labels >= 0) & (labels < self.num_classes)).all(),
                           f"values outside [0, {self.num_classes})"))
        flags = torch.stack([flag for _, _, flag, _ in checks]).tolist()
        for (name, tensor, _, problem), good in zip(checks, flags):
            if not good:
                raise ObjectiveInputError(f"{name} of shape {shape_of(tensor)} has {problem}")

    # -- the objective --------------------------------------------------------------------------
    def _kd_inputs(self, f_s: torch.Tensor, f_t: torch.Tensor) -> KDInputs:
        student = self.projector(f_s) if self.projector is not None else f_s
        student_hat, teacher_hat = F.normalize(student, dim=1), F.normalize(f_t, dim=1)
        return KDInputs(student=student, teacher=f_t, student_hat=student_hat,
                        teacher_hat=teacher_hat, cosine=(student_hat * teacher_hat).sum(dim=1))

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor | None, labels: torch.Tensor,
                check_values: bool = True) -> ObjectiveOutput:
        """METHOD (E5) for student embeddings ``f_s`` [B, Ds] (with gradient), teacher embeddings
        ``f_t`` [B, Dt] (or None without a teacher) and int64 ``labels`` [B].

        ``check_values=False`` skips the device-side checks (finiteness, label range) and their
        host read, for callers that make them elsewhere; shapes are always checked."""
        if check_values:
            self._check_inputs(f_s, f_t, labels)
        else:
            self._check_shapes(f_s, f_t, labels)
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            f_s = f_s.float()
            values: dict[str, torch.Tensor] = {}
            weighted: dict[str, torch.Tensor] = {}
            if self.head is not None:
                values["sphereface2"] = self.head(f_s, labels)
                weighted["sphereface2"] = self.head_weight * values["sphereface2"]
            cosine, inputs = None, None
            if f_t is not None and (self.projector is not None
                                    or self.student_dim == self.teacher_dim):
                inputs = self._kd_inputs(f_s, f_t.float())
                cosine = inputs.cosine.detach().mean()
                for name, term in self.kd_terms.items():
                    values[name] = term(inputs)
                    weighted[name] = self.term_weight(name) * values[name]
            total = torch.stack(list(weighted.values())).sum()
        return ObjectiveOutput(total=total, terms={k: v.detach() for k, v in values.items()},
                               cosine=cosine, weighted=weighted, inputs=inputs)

    def diagnostics(self, out: ObjectiveOutput, f_s: torch.Tensor) -> dict[str, torch.Tensor]:
        """METHOD D1 of ``out`` (this objective's output for the embeddings ``f_s``, before
        its backward): per-term gradient norms and shares, loss shares and the mining
        statistics of ILED and RPSD, on the global batch. A collective; no host sync."""
        statistics = {}
        if out.inputs is not None:
            for term in self.kd_terms.values():
                if hasattr(term, "statistics"):
                    statistics.update(term.statistics(out.inputs))
        return term_diagnostics(out.weighted, f_s, statistics)

    def balance(self, diagnostics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """METHOD (E7): update the balanced weights from this logging step's D1 ``diagnostics``
        (on the device, identical on every rank); returns what to log (nothing without it)."""
        return self.balancer.update(diagnostics) if self.balancer is not None else {}

    @torch.no_grad()
    def update_bank(self, f_s: torch.Tensor, f_t: torch.Tensor | None,
                    ema_f_s: torch.Tensor | None = None) -> None:
        """Enqueue this step's global batch into the memory bank (METHOD E3): all ranks
        all-gather their normalized (projected) student and teacher embeddings in rank order,
        so the bank stays identical everywhere. Call after the step; no-op without RPSD.

        With a projector, the student rows are projected with its current weights. With an
        EMA student (``ema_student_bank``, E4) the student rows are ``ema_f_s``, its embeddings
        of the same images (:meth:`ema_embeddings`)."""
        bank = self.bank
        if bank is None:
            return
        if f_t is None:
            raise ObjectiveInputError("update_bank: f_t (teacher embeddings) is None but RPSD "
                                      "is enabled")
        if self.ema_student is not None:
            if ema_f_s is None:
                raise ObjectiveInputError("update_bank: ema_f_s (EMA student embeddings) is "
                                          "None but RPSD's student anchor is ema_student_bank")
            f_s = ema_f_s
        self._check_embeddings(f_s, f_t)
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            inputs = self._kd_inputs(f_s.float(), f_t.float())
            both = dist.all_gather_cat(torch.cat([inputs.teacher_hat, inputs.student_hat], dim=1))
        bank.enqueue(both[:, :self.teacher_dim], both[:, self.teacher_dim:])

    @torch.no_grad()
    def ema_embeddings(self, student: nn.Module, images: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """With ``ema_student_bank`` (E4): move the EMA student one step towards ``student``
        (after its optimizer step), then embed each micro-batch of ``images`` with it (as
        float32, for :meth:`update_bank`). None without an EMA student."""
        if self.ema_student is None:
            return None
        self.ema_student.follow(student)
        return [self.ema_student(x).float() for x in images]


def build_objective(loss_cfg: LossConfig, num_classes: int, student_dim: int, teacher_dim: int,
                    global_batch: int, projector: bool = False,
                    device: torch.device | str = "cpu",
                    student: nn.Module | None = None) -> Objective:
    """The objective of METHOD (E5) for ``loss_cfg``: terms with weight 0 are left out.

    ``global_batch`` sizes the memory bank (``Q = bank_factor · G``); ``projector`` adds a
    linear map ``student_dim → teacher_dim`` in front of the distillation terms, required
    when the dims differ and any distillation term is enabled. ``student`` (the bare model,
    identical on every rank) is copied into the EMA student that
    ``loss.rpsd.student_anchor=ema_student_bank`` needs (E4). With ``loss.balance.enabled``
    the distillation weights are balanced (E7), starting from the configured ones. A
    collective: call it on every rank after ``dist.init``; replicated parameters start as
    rank 0's, a class-sharded head takes this rank's rows of the same initial matrix.
    """
    kd_terms: dict[str, tuple[nn.Module, float]] = {}
    if loss_cfg.iled.weight > 0:
        c = loss_cfg.iled
        kd_terms["iled"] = (ILED(c.r, c.s, c.b, c.distance_weighting), c.weight)
    if loss_cfg.rpsd.weight > 0:
        c, bank_cfg = loss_cfg.rpsd, loss_cfg.bank
        bank = MemoryBank(bank_cfg.bank_factor * global_batch, teacher_dim, bank_cfg.update,
                          bank_cfg.seed, device=device)
        kd_terms["rpsd"] = (RPSD(bank, c.r, c.t, c.b, c.student_anchor), c.weight)
        if c.student_anchor == "ema_student_bank" and student is None:
            raise ObjectiveInputError("loss.rpsd.student_anchor=ema_student_bank needs the "
                                      "student model (build_objective(..., student=...))")
    if loss_cfg.l2.weight > 0:
        kd_terms["l2"] = (L2Distillation(), loss_cfg.l2.weight)
    if loss_cfg.fc.weight > 0:
        kd_terms["fc"] = (FeatureConsistency(), loss_cfg.fc.weight)
    if loss_cfg.rkd.weight > 0:
        c = loss_cfg.rkd
        kd_terms["rkd"] = (RelationalKD(c.distance_weight, c.angle_weight), c.weight)
    if kd_terms and student_dim != teacher_dim and not projector:
        raise ObjectiveInputError(
            f"student embedding dim {student_dim} (model.embedding_dim) differs from the "
            f"teacher's {teacher_dim} with distillation terms {', '.join(kd_terms)}: set "
            f"model.projector=true, or model.embedding_dim={teacher_dim}")
    sf = loss_cfg.sphereface2
    if sf.weight <= 0 and not kd_terms:
        raise ObjectiveInputError("no loss term is enabled: every loss.*.weight is 0")
    head = None
    if sf.weight > 0:
        head = SphereFace2Head(num_classes, student_dim, lamb=sf.lamb, r=sf.r, m=sf.m, t=sf.t,
                               lw=sf.lw, class_sharded=sf.parallel == "class_sharded",
                               device=device)
    linear = (nn.Linear(student_dim, teacher_dim, bias=False, device=device)
              if projector else None)
    objective = Objective(num_classes, student_dim, teacher_dim, head, sf.weight, kd_terms, linear,
                          _balancer(loss_cfg, kd_terms, device), _ema_student(loss_cfg, student))
    dist.broadcast_tensors_(objective.replicated_parameters())  # identical start on every rank
    return objective


def _balancer(loss_cfg: LossConfig, kd_terms: dict[str, tuple[nn.Module, float]],
              device: torch.device | str) -> TermBalancer | None:
    """The adaptive weights of METHOD (E7) for the enabled distillation terms, or None."""
    balance = loss_cfg.balance
    if not balance.enabled:
        return None
    targets = {name: getattr(balance, name) for name in kd_terms}
    return TermBalancer(targets, {name: weight for name, (_, weight) in kd_terms.items()},
                        balance.smoothing, balance.min_weight, balance.max_weight, device)


def _ema_student(loss_cfg: LossConfig, student: nn.Module | None) -> EMAStudent | None:
    """The EMA student of ``ema_student_bank`` (METHOD E4), or None."""
    rpsd = loss_cfg.rpsd
    if rpsd.weight > 0 and rpsd.student_anchor == "ema_student_bank":
        return EMAStudent(student, rpsd.ema_momentum)
    return None
