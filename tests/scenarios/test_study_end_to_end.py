"""``fr-distill study`` end to end: a reduced study (runs reused, resume after an
interruption, a failed run reported, ``--report-only``, a changed config refused)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import GOOD, REPO, background_popen, background_run, torchrun_env, write_spec


def study_command(spec: Path, out: Path) -> list[str]:
    return [sys.executable, "tools/study.py", str(spec), "--out", str(out)]


def run_study(spec: Path, out: Path, *args: str, check: bool = True,
              timeout: float = 1800) -> subprocess.CompletedProcess:
    proc = background_run([*study_command(spec, out), *args], cwd=REPO, env=torchrun_env(),
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def interrupt_after(spec: Path, out: Path, marker: Path, timeout: float = 1800) -> None:
    """Start the study and kill it as a node failure would, as soon as ``marker`` exists: its
    process group, and the training workers, which torchrun starts in sessions of their own."""
    proc = background_popen(study_command(spec, out), cwd=REPO, env=torchrun_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            assert proc.poll() is None, f"the study ended ({proc.returncode}) before {marker}"
            assert time.monotonic() < deadline, f"no {marker} after {timeout} s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-KILL", "-f", f"run.output_dir={out}"], check=False)
        proc.wait()


def table_rows(markdown: str, header_start: str) -> dict[str, list[str]]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def reduced_study(root: Path) -> dict:
    """The reduced study's sequence (the background job of the test below), with what each
    step printed and left: killed while the second student trains (the teacher and
    none/seed1 are done by then), run again to the end, run a third time, ``--report-only``
    with one more variant in the spec, and run with a changed student config. Each run is one
    torchrun process (``nproc: 1``, half the process starts); the quick demo's test runs the
    study's students on 2 ranks."""
    body = GOOD.replace("variants:", "nproc: 1\nvariants:")
    spec = write_spec(root, body + "  broken: [optim.lr=1e30, run.max_nonfinite_steps=1]\n")
    out = root / "out"
    seen: dict = {"root": root, "out": out}
    interrupt_after(spec, out, out / "runs" / "iled" / "seed1" / "config.yaml")
    seen["report after the kill"] = (out / "study.md").exists()
    seen["second"] = run_study(spec, out)
    seen["second report"] = (out / "study.md").read_text()
    seen["figures"] = {figure: (out / figure).stat().st_size
                       for figure in ("loss_terms.png", "cosine.png", "grad_share.png")}
    seen["iled config"] = (out / "runs" / "iled" / "seed1" / "config.yaml").read_text()
    seen["iled records"] = (out / "runs" / "iled" / "seed1" / "metrics.jsonl").read_text()
    seen["third"] = run_study(spec, out)  # finished runs are reused; failed ones tried again
    seen["third report"] = (out / "study.md").read_text()
    spec.write_text(spec.read_text() + "  fc: [loss.fc.weight=1.0]\n")
    seen["report only"] = run_study(spec, out, "--report-only", check=False, timeout=600)
    seen["report-only report"] = (out / "study.md").read_text()
    student = root / "student.yaml"
    student.write_text(student.read_text() + "optim: {lr: 0.05}\n")
    seen["changed config"] = run_study(spec, out, check=False, timeout=600)
    return seen


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.background(job=reduced_study)
def test_reduced_study_reuses_resumes_and_reports(background):
    out = background["out"]
    assert not background["report after the kill"]

    second = background["second"]
    said = second.stdout
    assert "reusing teacher" in said and "reusing none/seed1" in said, said
    assert "training iled/seed1" in said and "training none/seed2" in said, said
    assert "broken/seed1: failed (training exited with status 1; log: " in said, said
    report = background["second report"]
    results = table_rows(report, "| model | seeds |")
    assert list(results) == ["teacher", "none", "iled"]
    header = report.splitlines()[[l.startswith("| model | seeds |") for l in
                                  report.splitlines()].index(True)]
    assert header == ("| model | seeds | synth_cfp acc | synth_lfw acc | mean acc | IJBS TAR@0.001 "
                      "| IJBS TAR@0.01 | IJBS rank-1 | cosine |")
    assert results["teacher"][0] == "1" and results["none"][0] == "2" and results["iled"][0] == "2"
    assert all(" ± " in cell for cell in results["iled"][1:]), results["iled"]
    for cell in results["none"][1:-1]:
        assert 0.0 <= float(cell.split(" ± ")[0]) <= 100.0
    diffs = table_rows(report, "| model | paired seeds |")
    assert list(diffs) == ["teacher", "iled"] and diffs["iled"][0] == "2"
    for cell in diffs["iled"][1:]:
        diff, low, high = (float(v) for v in cell.replace("[", "").replace("]", "")
                           .replace(",", "").split())
        assert low <= diff <= high, cell
    failed = table_rows(report, "| run | error | log |")
    assert list(failed) == ["broken/seed1", "broken/seed2"]
    assert all(Path(row[1].strip("`")).is_file() for row in failed.values())
    for figure, size in background["figures"].items():
        assert size > 5_000, figure
    # the students read the teacher's rows from the cache the study built once (float32)
    assert "teacher cache -> " in second.stdout and (out / "teacher_cache" / "manifest.json").is_file()
    config = background["iled config"]
    assert f"cache: {out / 'teacher_cache'}" in config and "cache_dtype: float32" in config
    # the diagnostics reached the runs' records
    records = background["iled records"]
    assert '"grad_share/iled"' in records and '"iled/below_target"' in records

    third = background["third"]  # finished runs are reused; failed ones are tried again
    trained = set(re.findall(r"\) training (\S+) \|", third.stdout))
    assert third.stdout.count(") reusing ") == 5 and trained == {"broken/seed1", "broken/seed2"}, \
        third.stdout
    assert table_rows(background["third report"], "| model | seeds |") == results

    # --report-only trains nothing: with one more variant in the spec, the report lists its
    # runs as not run and keeps the finished ones
    only = background["report only"]
    assert only.returncode == 0 and ") training " not in only.stdout, only.stdout + only.stderr
    assert "fc/seed1: not run (--report-only)" in only.stdout
    report = background["report-only report"]
    assert table_rows(report, "| model | seeds |") == results
    section = report.split("## Runs not run")[1].split("\n## ")[0]
    not_run = section.strip().splitlines()[-1].split(", ")
    assert not_run == ["broken/seed1", "fc/seed1", "broken/seed2", "fc/seed2"], not_run

    # a run directory written with another config is refused, not silently reused
    proc = background["changed config"]
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "holds a run with another config than the study's 'none/seed1'" in proc.stderr
