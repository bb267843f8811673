"""The trainer's optimizer step (fr_distill/engine/step.py) reads one device value on the host,
whatever the accumulation, clipping and loss terms.

Host reads are counted by wrapping the tensor methods that move a value to the host
(``item``, ``tolist``, ``cpu``, ``numpy``, and the ``bool``/``float``/``int``/``index``
conversions) while the step and its callbacks run; on a CPU nothing else tells a read apart.
"""
from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch

from fr_distill.config import load_config
from fr_distill.engine import step as engine_step
from fr_distill.engine import trainer
from fr_distill.engine.trainer import train
from fr_distill.engine.callbacks import Callback

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class HostReads:
    """Counts host reads of tensors while ``active``, with where each came from."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.active = False
        self.calls: list[str] = []
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))

    def _counting(self, name: str, original):
        def read(tensor, *args, **kwargs):
            if self.active:
                caller = traceback.extract_stack(limit=2)[0]
                self.calls.append(f"{name} at {Path(caller.filename).name}:{caller.lineno}")
            return original(tensor, *args, **kwargs)
        return read


def test_one_host_read_per_optimizer_step(synthetic_data, teacher_file, tmp_path, monkeypatch,
                                          single_thread):
    """Unified objective (SphereFace2 + ILED + RPSD with its bank), 2 micro-steps per optimizer
    step, gradient clipping, diagnostics on logging steps: each step that is neither a logging,
    checkpoint nor evaluation step reads exactly one value (the agreed flags); the logging
    steps read only what the logging callback prints."""
    reads = HostReads(monkeypatch)
    per_step: dict[int, list[str]] = {}
    real_step = trainer.train_step

    def counted_step(run, batches, stop):
        prefetched = iter([next(batches) for _ in range(run.accumulation)])  # the loader's own
        reads.active, reads.calls = True, []                             # index work excluded
        return real_step(run, prefetched, stop)

    class StopCounting(Callback):  # runs after the built-in callbacks
        def on_step_end(self, run, stats):
            reads.active = False
            per_step[run.step] = reads.calls

    monkeypatch.setattr(trainer, "train_step", counted_step)
    cfg = load_config(None, [
        f"data.train={synthetic_data / 'train'}", "data.loader=torch", "data.num_workers=0",
        "model.width=0.125", "model.embedding_dim=32", "precision.amp=fp32",
        f"run.output_dir={tmp_path / 'run'}", "logging.tensorboard=false",
        f"teacher.path={teacher_file}", "teacher.name=iresnet18", "teacher.width=0.125",
        "teacher.embedding_dim=32", "data.batch_size=4", "optim.accumulation_steps=2",
        "optim.grad_clip=5", "schedule.total_steps=8", "logging.every_steps=4",
        "checkpoint.every_steps=100"])
    assert cfg.loss.iled.weight > 0 and cfg.loss.rpsd.weight > 0 and cfg.logging.diagnostics
    result = train(cfg, callbacks=[StopCounting()])
    assert result.step == 8 and sorted(per_step) == list(range(1, 9))
    for step in (1, 2, 3, 5, 6, 7):
        assert len(per_step[step]) == 1 and per_step[step][0].startswith("tolist at step.py"), \
            (step, per_step[step])
    # a logging step adds the logging callback's reads: the window's means, the gradient norm
    # and the diagnostics (step 8 also writes the final checkpoint, which reads everything)
    logged = [call for call in per_step[4] if "run_log.py" in call]
    assert len(logged) == 3 and len(per_step[4]) == 4, per_step[4]
    assert per_step[4][0].startswith("tolist at step.py"), per_step[4]


def test_nonfinite_flags_name_the_embeddings_first():
    """A NaN in the student embeddings makes every term NaN: the embeddings are what is
    reported; a NaN term alone is reported by name."""
    nan = torch.full((), float("nan"))

    class Out:
        terms = {"sphereface2": nan, "iled": torch.tensor(0.5)}
        total = nan

    good = torch.zeros(2, 3)
    names, flags = engine_step.nonfinite_flags(good.clone().fill_(float("inf")), good, Out())
    assert names == ["student embeddings", "teacher embeddings", "sphereface2", "iled", "total"]
    assert flags.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    _, flags = engine_step.nonfinite_flags(good, None, Out())
    assert flags.tolist() == [0.0, 1.0, 0.0, 1.0]
