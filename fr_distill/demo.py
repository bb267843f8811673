"""``make demo``: the whole distillation workflow on the synthetic face data set, on CPUs.

Steps, each skipped when a previous run already finished it (so a second run reuses them):

1. generate the synthetic data set (training folder, `.bin` verification sets, IJB-style
   release) with :func:`fr_distill.data.synthetic.generate`;
2. train the teacher (a deeper, wider IResNet, SphereFace2 only) — ``configs/demo/teacher.yaml``;
3. train four students from the same initialization, each under
   ``torchrun --nproc_per_node 2 launch/train.py`` (gloo: the production code path):
   no distillation, ILED only, RPSD only, and the unified objective —
   ``configs/demo/student_<name>.yaml``;
4. evaluate the teacher and every student on the `.bin` sets (V1) and the IJB-style set
   (V2 1:1, V3 1:N) with :func:`fr_distill.eval.runner.evaluate_model`;
5. print a results table and write ``report.md`` (table + ROC curves) in the output directory.

``quick=True`` shortens every schedule and shrinks the data set: the form run by the tests.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from fr_distill.config import load_config
from fr_distill.data.synthetic import generate
from fr_distill.engine.checkpoint import CheckpointStore
from fr_distill.engine.plan import CHECKPOINT_SUBDIR
from fr_distill.eval.plots import plot_roc
from fr_distill.eval.runner import evaluate_model
from fr_distill.models import load_teacher

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "demo"
STUDENTS = ("none", "iled", "rpsd", "unified")
IJB_NAME = "IJBS"


@dataclasses.dataclass(frozen=True)
class DemoScale:
    """Data-set size and schedule lengths of one demo form."""

    identities: int
    images: int
    bin_pairs: int
    ijb_subjects: int
    teacher_steps: int
    student_steps: int


FULL = DemoScale(identities=100, images=24, bin_pairs=200, ijb_subjects=20,
                 teacher_steps=280, student_steps=160)
QUICK = DemoScale(identities=40, images=8, bin_pairs=100, ijb_subjects=10,
                  teacher_steps=20, student_steps=8)


def _say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _final_checkpoint(run_dir: Path, steps: int) -> Path:
    return run_dir / CHECKPOINT_SUBDIR / f"step_{steps:08d}.pt"


def _finished(run_dir: Path, steps: int) -> bool:
    store = CheckpointStore(run_dir / CHECKPOINT_SUBDIR, keep_last=1)
    return steps in store.steps() and store.latest_valid() == _final_checkpoint(run_dir, steps)


def _train(name: str, config: Path, overrides: list[str], run_dir: Path, steps: int,
           nproc: int) -> Path:
    """Train one model under torchrun unless its final checkpoint is already there."""
    if _finished(run_dir, steps):
        _say(f"{name}: reusing {_final_checkpoint(run_dir, steps)}")
        return _final_checkpoint(run_dir, steps)
    overrides = overrides + [f"run.output_dir={run_dir}", f"schedule.total_steps={steps}",
                             f"schedule.warmup_steps={steps // 10}"]
    load_config(config, overrides)  # a config error stops here, before any process starts
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           str(REPO / "launch" / "train.py"), "--config", str(config), *overrides]
    _say(f"{name}: training {steps} steps on {nproc} processes -> {run_dir}")
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    code = subprocess.run(cmd, cwd=REPO, env=env).returncode
    if code != 0:
        raise SystemExit(f"demo: training the {name} failed with exit status {code} (its output "
                         f"is above); run `make demo` again to resume it")
    return _final_checkpoint(run_dir, steps)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _row(name: str, results: dict) -> dict:
    """The report's numbers for one model (percentages)."""
    ijb = results["ijb"][IJB_NAME]
    nearest = ijb["verification"]["nearest"]
    row = {"model": name}
    for set_name, metrics in results["bin"].items():
        row[f"{set_name} acc"] = 100 * metrics["accuracy_mean"]
    row["TAR@FAR=1e-4"] = 100 * nearest[1e-4]
    row["TAR@FAR=1e-3"] = 100 * nearest[1e-3]
    row["rank-1"] = 100 * ijb["identification"]["rank1"]
    return row


def format_rows(rows: list[dict]) -> str:
    """A markdown table of the report rows."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(row[k] if k == "model" else f"{row[k]:.2f}" for k in keys) + " |")
    return "\n".join(lines)


def run_demo(out_dir: str | os.PathLike = "demo_out", quick: bool = False, nproc: int = 2) -> Path:
    """Run every step of the demo into ``out_dir``; returns the path of ``report.md``."""
    out = Path(out_dir).resolve()
    scale = QUICK if quick else FULL
    started = time.time()

    data = out / "data"
    _say(f"synthetic data set -> {data}")
    generate(data, num_identities=scale.identities, images_per_identity=scale.images, seed=0,
             bin_identities=max(40, scale.identities // 3), bin_pairs=scale.bin_pairs,
             ijb_name=IJB_NAME, ijb_subjects=scale.ijb_subjects)
    common = [f"data.train={data / 'train'}"]

    runs = out / "runs"
    checkpoints = {"teacher": _train("teacher", CONFIGS / "teacher.yaml", common,
                                     runs / "teacher", scale.teacher_steps, nproc)}
    for student in STUDENTS:
        overrides = common + [f"teacher.path={checkpoints['teacher']}"]
        checkpoints[student] = _train(f"student ({student})", CONFIGS / f"student_{student}.yaml",
                                      overrides, runs / f"student_{student}",
                                      scale.student_steps, nproc)

    bins = sorted(str(p) for p in data.glob("*.bin"))
    rows, curves = [], {}
    for name, ckpt in checkpoints.items():
        _say(f"evaluating {name}")
        model = load_teacher(str(ckpt), device="cpu")
        roc: dict = {}
        results = evaluate_model(model, "cpu", bins, [(str(data / "ijb" / IJB_NAME), IJB_NAME)],
                                 out / "eval" / name, batch_size=64,
                                 cache_key={"checkpoint": str(ckpt),
                                            "mtime": ckpt.stat().st_mtime_ns},
                                 roc_curves=roc)
        rows.append(_row(name, results))
        curves[name] = roc[IJB_NAME]

    report = out / "report.md"
    roc_png = plot_roc(curves, out / "roc_ijb.png", title=f"IJB-style 1:1 ROC ({IJB_NAME})")
    table = format_rows(rows)
    report.write_text(
        "# fr_distill demo report\n\n"
        f"Synthetic data: {scale.identities} training identities x {scale.images} images; "
        f"teacher {scale.teacher_steps} steps, students {scale.student_steps} steps each "
        f"({nproc} processes, gloo).\n\n"
        "Accuracy: 10-fold verification accuracy (V1). TAR: nearest ROC point (V2). "
        "rank-1: 1:N identification, both galleries (V3). All in %.\n\n"
        f"{table}\n\n![ROC]({roc_png.name})\n")
    print("\n" + table + "\n")
    _say(f"done in {time.time() - started:.0f} s; report: {report}")
    return report
