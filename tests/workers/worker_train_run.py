"""Train under torchrun with optional fault injection; rank 0 writes ``result.json``.

    worker_train_run.py [--fault kill|term --fault-step K --fault-rank R --marker PATH]
                        [--teacher-file PATH] key=value ...

``--fault kill`` SIGKILLs rank R right after step K (a crashed worker: torchrun restarts the
group, which resumes from the newest checkpoint); ``--fault kill-eval`` SIGKILLs it as the
evaluation of step K starts, while the other ranks are inside the evaluation's collectives;
``--fault term`` sends it SIGTERM (a preemption notice). The marker file makes the fault happen once across restarts.
``result.json`` records the status, the step range and whether the teacher's tensors are
bitwise those of ``--teacher-file``. Exits with REQUEUE_EXIT_CODE when preempted.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

from fr_distill import dist
from fr_distill.config import load_config
from fr_distill.engine import REQUEUE_EXIT_CODE
from fr_distill.engine.trainer import train
from fr_distill.engine.callbacks import Callback


class InjectFault(Callback):
    def __init__(self, kind: str, step: int, rank: int, marker: Path) -> None:
        self.sig = signal.SIGKILL if kind == "kill" else signal.SIGTERM
        self.step, self.rank, self.marker = step, rank, marker

    def on_step_end(self, run, stats) -> None:
        if run.step == self.step and dist.rank() == self.rank and not self.marker.exists():
            self.marker.write_text(str(self.step))
            os.kill(os.getpid(), self.sig)


def kill_during_evaluation(step: int, rank: int, marker: Path) -> None:
    """SIGKILL rank ``rank`` when the evaluation of step ``step`` begins (once)."""
    from fr_distill.engine.callbacks import EvalCallback

    evaluate = EvalCallback.on_step_end

    def on_step_end(self, run, stats) -> None:
        if (self._due(run) and run.step == step and dist.rank() == rank
                and not marker.exists()):
            marker.write_text(str(step))
            os.kill(os.getpid(), signal.SIGKILL)
        evaluate(self, run, stats)

    EvalCallback.on_step_end = on_step_end


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fault", choices=["kill", "kill-eval", "term"])
    parser.add_argument("--fault-step", type=int, default=0)
    parser.add_argument("--fault-rank", type=int, default=1)
    parser.add_argument("--marker", type=Path)
    parser.add_argument("--teacher-file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(None, args.overrides)
    callbacks = [InjectFault(args.fault, args.fault_step, args.fault_rank, args.marker)] \
        if args.fault in ("kill", "term") else []
    if args.fault == "kill-eval":
        kill_during_evaluation(args.fault_step, args.fault_rank, args.marker)
    rank = int(os.environ.get("RANK", 0))
    result = train(cfg, callbacks)
    unchanged = None
    if args.teacher_file and result.teacher is not None:  # None: read from teacher.cache
        stored = torch.load(args.teacher_file, weights_only=True)
        now = result.teacher.model.state_dict()
        unchanged = stored.keys() == now.keys() and all(
            torch.equal(stored[k], now[k].cpu()) for k in stored)
    if rank == 0:
        (result.run_dir / "result.json").write_text(json.dumps(
            {"status": result.status, "step": result.step, "start_step": result.start_step,
             "teacher_unchanged": unchanged}))
    return REQUEUE_EXIT_CODE if result.status == "preempted" else 0


if __name__ == "__main__":
    sys.exit(main())
