"""Cost of the distillation objective next to the student step it is added to.

In one run, at the same batch, on the same device, timed in interleaved rounds (a load change
on a shared machine hits all alike), forward + backward of:
  * ``student``     — IResNet-18 (the paper's student), input ``[B, 3, 112, 112]``;
  * ``objective``   — the full objective of METHOD (E5) with the paper's weights: SphereFace2
                      over ``C`` classes (8,631 = VGGFace2) + ILED + RPSD against a full memory
                      bank (``Q = 3·B``), input checks and the bank update included;
  * ``objective+diagnostics`` — the same on a logging step: the per-term diagnostics of
                      METHOD (D1) before the backward (their cost is the difference);
  * ``sphereface2``, ``iled``, ``rpsd`` — each term alone, for the breakdown.
Prints the median milliseconds per variant and each one's ratio to the student step (the
target is < 2 % for the objective at batch 64 on a GPU); ``--json PATH`` writes them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from fr_distill.config import LossConfig
from fr_distill.losses import build_objective
from fr_distill.models import get_backbone
from fr_distill.precision import amp_dtype, autocast


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _objective_step(cfg: LossConfig, classes: int, dim: int, batch: int,
                    device: torch.device, diagnose: bool = False) -> Callable[[], None]:
    """Forward + backward of the objective built from ``cfg`` on fixed random embeddings, then
    the memory-bank update (a no-op without RPSD); with ``diagnose``, METHOD (D1) as on a
    logging step."""
    objective = build_objective(cfg, classes, dim, dim, global_batch=batch, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    f_s = torch.randn(batch, dim, device=device, generator=g, requires_grad=True)
    f_t = torch.randn(batch, dim, device=device, generator=g)
    labels = torch.randint(0, classes, (batch,), device=device, generator=g)
    if objective.bank is not None:
        while objective.bank.filled < objective.bank.capacity:
            objective.update_bank(torch.randn(batch, dim, device=device, generator=g),
                                  torch.randn(batch, dim, device=device, generator=g))

    def step() -> None:
        out = objective(f_s, f_t, labels)
        if diagnose:
            torch.stack(list(objective.diagnostics(out, f_s).values())).tolist()
        out.total.backward()
        objective.update_bank(f_s.detach(), f_t)
        f_s.grad = None
        objective.zero_grad(set_to_none=True)

    return step


def _student_step(batch: int, dim: int, device: torch.device, amp: str) -> Callable[[], None]:
    """Forward + backward of IResNet-18 on a fixed random image batch."""
    model = get_backbone("iresnet18", embedding_dim=dim).to(device).train()
    images = torch.randn(batch, 3, 112, 112, device=device)
    dtype = amp_dtype(amp, device)

    def step() -> None:
        with autocast(device, dtype):
            embedding = model(images)
        embedding.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return step


def _loss_config(iled: float, rpsd: float, sphereface2: float) -> LossConfig:
    cfg = LossConfig()
    cfg.iled.weight, cfg.rpsd.weight, cfg.sphereface2.weight = iled, rpsd, sphereface2
    return cfg


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="benchmark.py losses",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="samples per step")
    parser.add_argument("--classes", type=int, default=8631, help="SphereFace2 classes (VGGFace2)")
    parser.add_argument("--dim", type=int, default=512, help="embedding dim of student and teacher")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=("bf16", "fp16", "fp32"), default=None,
                        help="student autocast (default: bf16 on cuda, fp32 on cpu); the "
                             "objective always runs in float32")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up)")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    amp = args.amp or ("bf16" if device.type == "cuda" else "fp32")
    torch.manual_seed(0)
    sizes = (args.classes, args.dim, args.batch, device)
    variants: dict[str, Callable[[], None]] = {
        "student": _student_step(args.batch, args.dim, device, amp),
        "objective": _objective_step(LossConfig(), *sizes),
        "objective+diagnostics": _objective_step(LossConfig(), *sizes, diagnose=True),
        "sphereface2": _objective_step(_loss_config(0, 0, 1), *sizes),
        "iled": _objective_step(_loss_config(1, 0, 0), *sizes),
        "rpsd": _objective_step(_loss_config(0, 40, 0), *sizes),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.repeats + 1):
        for name, step in variants.items():
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            if round_index > 0:
                times[name].append(time.perf_counter() - start)
    median_ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    ratios = {name: ms / median_ms["student"]
              for name, ms in median_ms.items() if name != "student"}
    result = {"device": str(device), "batch": args.batch, "classes": args.classes, "dim": args.dim,
              "student_amp": amp, "repeats": args.repeats, "torch": torch.__version__,
              "median_ms": median_ms, "ratio_to_student": ratios}
    print(f"objective vs student step ({device}, batch {args.batch}, C={args.classes}, "
          f"D={args.dim}, student {amp}; median of {args.repeats} rounds)")
    print(f"{'variant':<24}{'fwd+bwd ms':>12}{'/ student':>12}")
    for name, ms in median_ms.items():
        ratio = "" if name == "student" else f"{100 * ratios[name]:>11.2f}%"
        print(f"{name:<24}{ms:>12.2f}{ratio:>12}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
