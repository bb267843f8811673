"""Features of the training loop as objects: checkpointing and periodic evaluation.

The loop calls every callback at the same points on every rank (``on_train_start``,
``on_step_end`` after each optimizer step, ``on_train_end``); callbacks that write files do
so on rank 0 only (but for the ranks' parts of a sharded checkpoint), and callbacks that need
collectives (gathering a class-sharded head, sharded evaluation) run them on all ranks. The logging callback lives in
:mod:`fr_distill.engine.run_log`.
"""
from __future__ import annotations

import json
import logging
import math

from fr_distill import dist
from fr_distill.checkpoint.files import CheckpointStore
from fr_distill.engine.faults import REQUEUE_MARKER
from fr_distill.engine.state import Run
from fr_distill.engine.step import StepStats
from fr_distill.eval import evaluate_bin_sets

log = logging.getLogger(__name__)


class Callback:
    """A feature of the loop; override the hooks it needs."""

    def on_train_start(self, run: Run) -> None:
        pass

    def on_step_end(self, run: Run, stats: StepStats) -> None:
        pass

    def on_train_end(self, run: Run) -> None:
        pass


class CallbackList(Callback):
    """Calls its callbacks in order."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = callbacks

    def on_train_start(self, run: Run) -> None:
        for cb in self.callbacks:
            cb.on_train_start(run)

    def on_step_end(self, run: Run, stats: StepStats) -> None:
        for cb in self.callbacks:
            cb.on_step_end(run, stats)

    def on_train_end(self, run: Run) -> None:
        for cb in self.callbacks:
            cb.on_train_end(run)


def _flatten(results: dict[str, dict]) -> dict[str, float]:
    """``{set: {metric: value}}`` → ``{"set/metric": value}`` (numbers only)."""
    return {f"{name}/{key}": float(value) for name, metrics in results.items()
            for key, value in metrics.items() if isinstance(value, (int, float))}


def one_line(err: BaseException) -> str:
    """``Type: first line of the message`` of an exception."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def lower_is_better(metric: str) -> bool:
    """Error rates are minimized; accuracies, AUC and TAR are maximized."""
    leaf = metric.rsplit("/", 1)[-1].lower()
    return leaf in ("eer", "far", "frr") or leaf.endswith(("_std", "error", "loss"))


class EvalCallback(Callback):
    """Verification on ``eval.bin_sets`` every ``eval.every_steps`` and at the end (METHOD V1),
    sharded across all ranks; keeps ``best.pt`` by ``eval.best_metric``.

    Runs before :class:`CheckpointCallback` so the step's checkpoint carries its results. An
    evaluation that fails (a set changed on disk since the pre-flight check, a decoder or
    memory error) never costs that checkpoint: the error is logged in one line and recorded
    in ``run.metrics["eval_error"]``, training goes on, and a failed final evaluation is kept
    in :attr:`final_error` for the loop to report after the last checkpoint is written. (A
    failure on some ranks only leaves the others waiting in a collective until
    ``distributed.timeout_s``; the sets' pre-flight check makes that rare.)
    """

    def __init__(self, store: CheckpointStore, on_results=None) -> None:
        self.store = store
        self.on_results = on_results or (lambda run, results: None)
        self.final_error: str | None = None

    def _due(self, run: Run) -> bool:
        every = run.cfg.eval.every_steps
        return bool(run.cfg.eval.bin_sets) and (run.finished or (every > 0 and run.step % every == 0))

    def on_step_end(self, run: Run, stats: StepStats) -> None:
        if not self._due(run):
            return
        run.student.eval()
        try:
            results = _flatten(evaluate_bin_sets(run.student, list(run.cfg.eval.bin_sets),
                                                 run.info.device,
                                                 batch_size=run.cfg.eval.batch_size,
                                                 amp_dtype=run.amp_dtype))
        except Exception as err:  # noqa: BLE001 - an evaluation must not cost the checkpoint
            message = one_line(err)
            log.error("evaluation at step %d failed (%s); %s", run.step, message,
                      "the final checkpoint is written next" if run.finished
                      else "training goes on")
            run.metrics["eval_error"] = {"step": run.step, "error": message}
            if run.finished:
                self.final_error = message
            return
        finally:
            run.set_train_mode()
        run.metrics["eval"] = {"step": run.step, **results}
        self.on_results(run, results)
        self._keep_best(run, results)

    def _keep_best(self, run: Run, results: dict[str, float]) -> None:
        metric = run.cfg.eval.best_metric
        if not metric:  # else one of the results: checked before training (check_bin_sets)
            return
        value, best = results[metric], run.metrics.get("best")
        better = (best is None or best.get("metric") != metric or
                  (value < best["value"] if lower_is_better(metric) else value > best["value"]))
        if math.isfinite(value) and better:
            run.metrics["best"] = {"metric": metric, "value": value, "step": run.step}
            # a sharded run's best.pt is its student alone: nothing to gather
            payload = run.student_state_dict() if self.store.sharded else run.state_dict()
            if dist.is_main():
                path = self.store.save_best(payload)
                log.info("best %s = %.5f at step %d -> %s", metric, value, run.step, path)
            dist.barrier()


class CheckpointCallback(Callback):
    """A checkpoint every ``checkpoint.every_steps``, at the end, and when stopping on a signal
    (then also the requeue marker). A file: all ranks build the state, rank 0 writes it; a
    sharded checkpoint (``checkpoint.format=dcp``): every rank writes its part, with
    ``checkpoint.async_save`` in the background, committed at the next checkpoint and before
    the run ends."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store

    def on_train_start(self, run: Run) -> None:
        if dist.is_main():
            (run.run_dir / REQUEUE_MARKER).unlink(missing_ok=True)

    def on_step_end(self, run: Run, stats: StepStats) -> None:
        due = run.step % run.cfg.checkpoint.every_steps == 0 or run.finished or run.stop_requested
        if not due:
            return
        payload = run.state_dict(sharded=self.store.sharded)
        if self.store.sharded or dist.is_main():
            path = self.store.save_step(payload, run.step)
        del payload
        if run.stop_requested or run.finished:  # committed before the run ends
            self.store.finish_pending()
        if dist.is_main():
            log.info("checkpoint %s%s", path, " (writing in the background)"
                     if self.store.pending else "")
            if run.stop_requested and not run.finished:
                (run.run_dir / REQUEUE_MARKER).write_text(json.dumps({"step": run.step}) + "\n")
        dist.barrier()
