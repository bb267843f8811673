"""``fr-distill study``: the bootstrap on known inputs, the spec's one-line refusals, and a
reduced study end to end (runs reused, resume after an interruption, a failed run reported)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, background_popen, background_run, torchrun_env
from fr_distill.study import StudyError, load_spec
from fr_distill.study.stats import (accuracy, bootstrap_interval, mean_std, paired_bootstrap,
                                    tar_at_far_metric)

STUDY_CONFIGS = REPO / "configs" / "study"


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
def test_mean_std_is_the_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)


def test_bootstrap_of_a_constant_difference_is_that_constant():
    base = {"correct": np.array([True, False] * 50)}
    better = {"correct": base["correct"] | (np.arange(100) % 4 == 1)}  # +25 points, same pairs
    interval = paired_bootstrap([better] * 3, [base] * 3, accuracy, replicates=2000)
    assert interval.value == pytest.approx(25.0)
    # every resample of pairs changes both models alike only where they agree: the difference
    # is the share of the 25 flipped pairs among the drawn ones, binomial around 25
    assert interval.low < 25.0 < interval.high
    sd = 100 * np.sqrt(0.25 * 0.75 / 100)
    assert interval.low == pytest.approx(25.0 - 1.96 * sd, abs=2.0)
    assert interval.high == pytest.approx(25.0 + 1.96 * sd, abs=2.0)


def test_bootstrap_over_seeds_alone_has_the_exact_percentiles():
    """Differences identical on every pair but 1, 2, 3 points by seed: resampling pairs
    changes nothing, resampling 3 seeds gives means from 1 to 3 where P(mean = 1) = 1/27 > 2.5 %."""
    n = 100
    base = {"correct": np.zeros(n, dtype=bool)}
    variants = [{"correct": np.arange(n) < k} for k in (1, 2, 3)]  # k % of pairs correct
    interval = paired_bootstrap(variants, [base] * 3, lambda arrays, units: float(
        100 * arrays["correct"].mean()), replicates=2000)  # a metric that ignores the pair draw
    assert interval.value == pytest.approx(2.0)
    assert (interval.low, interval.high) == (pytest.approx(1.0), pytest.approx(3.0))


def test_bootstrap_refuses_unpaired_inputs():
    one = {"correct": np.ones(4, dtype=bool)}
    with pytest.raises(ValueError, match="same non-zero number"):
        paired_bootstrap([one, one], [one], accuracy)
    with pytest.raises(ValueError, match="different numbers of units"):
        paired_bootstrap([one], [{"correct": np.ones(5, dtype=bool)}], accuracy)


def test_tar_at_far_by_hand():
    # 10 impostors 0.0..0.9, 4 genuine pairs: at FAR 0.1 one impostor (0.9) may pass, the
    # threshold is the 2nd highest impostor (0.8): genuine 0.85 and 0.95 pass, 0.5 and 0.8 do not.
    scores = np.array([*np.arange(10) / 10, 0.5, 0.8, 0.85, 0.95])
    labels = np.array([False] * 10 + [True] * 4)
    arrays = {"scores": scores, "labels": labels}
    assert tar_at_far_metric(0.1)(arrays, None) == pytest.approx(50.0)
    assert tar_at_far_metric(0.05)(arrays, None) == pytest.approx(25.0)  # above 0.9
    units = np.array([0, 1, 12, 13, 13])  # impostors 0.0, 0.1; genuine 0.85, 0.95, 0.95
    assert tar_at_far_metric(0.1)(arrays, units) == pytest.approx(100.0)


def test_accuracy_and_its_interval_use_every_unit():
    arrays = {"correct": np.array([1, 1, 0, 0], bool)}
    assert accuracy(arrays, None) == pytest.approx(50.0)
    assert accuracy(arrays, np.array([0, 0, 2])) == pytest.approx(200 / 3)
    # 1,000 pairs at 80 %: the interval is the binomial one, 80 ± 1.96·sqrt(0.8·0.2/1000)·100
    model = {"correct": np.arange(1000) % 5 != 0}
    interval = bootstrap_interval([model], accuracy, replicates=2000)
    half = 1.96 * 100 * np.sqrt(0.8 * 0.2 / 1000)
    assert interval.value == pytest.approx(80.0)
    assert interval.low == pytest.approx(80 - half, abs=0.5)
    assert interval.high == pytest.approx(80 + half, abs=0.5)


# ----------------------------------------------------------------------------------------------
# The spec
# ----------------------------------------------------------------------------------------------
def write_spec(tmp_path: Path, body: str) -> Path:
    (tmp_path / "student.yaml").write_text(
        f"defaults: [{STUDY_CONFIGS / 'student.yaml'}]\n"
        "schedule: {total_steps: 4, warmup_steps: 1}\n"
        "checkpoint: {every_steps: 2}\nlogging: {every_steps: 2}\ndata: {batch_size: 8}\n")
    (tmp_path / "teacher.yaml").write_text(
        f"defaults: [{STUDY_CONFIGS / 'teacher.yaml'}]\n"
        "schedule: {total_steps: 4, warmup_steps: 1}\n"
        "checkpoint: {every_steps: 2}\nlogging: {every_steps: 2}\ndata: {batch_size: 8}\n")
    spec = tmp_path / "study.yaml"
    spec.write_text(body)
    return spec


GOOD = """
data:
  synthetic: {identities: 10, images_per_identity: 4, bin_identities: 10, bin_pairs: 40,
              ijb_subjects: 6}
teacher: {config: teacher.yaml}
student: student.yaml
seeds: [1, 2]
bootstrap: 200
teacher_cache: true
variants:
  none: []
  iled: [loss.iled.weight=1.0]
"""


def test_the_shipped_study_spec_loads():
    spec = load_spec(STUDY_CONFIGS / "study.yaml")
    assert {"none", "iled", "rpsd", "unified", "l2", "fc", "rkd"} <= set(spec.variants)
    assert spec.baseline == "none" and len(spec.seeds) >= 3


@pytest.mark.parametrize("change, message", [
    (("iled: [loss.iled.weight=1.0]", "iled: [loss.iled.weigth=1.0]"),
     r"variant 'iled': .*unknown config key 'loss.iled.weigth'; did you mean loss.iled.weight"),
    (("teacher: {config: teacher.yaml}", "teacher: {path: missing.pt}"),
     r"'teacher.path' file not found: .*missing.pt"),
    (("seeds: [1, 2]", "seeds: [1, 2, 1]"), r"'seeds' lists 1 more than once"),
    (("variants:", "variantz:"), r"unknown key 'variantz' \(did you mean 'variants'\?\)"),
    (("bootstrap: 200", "bootstrap: 200\nbaseline: rpsd"), r"'baseline' 'rpsd' is not a variant"),
    (("iled: [loss.iled.weight=1.0]", "iled: [loss.iled.weight=heavy]"),
     r"variant 'iled': .*'loss.iled.weight' must be float"),
    (("bootstrap: 200", "bootstrap: 200\nx: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
      + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
                f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
                f"*{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(7))),
     r"aliases \(\*name\) expand to more than"),
    (("teacher_cache: true", "teacher_cache: yes please"),
     r"'teacher_cache' must be true or false, got 'yes please'"),
    (("iled: [loss.iled.weight=1.0]", "iled: [loss.iled.weight=1.0, loss.balance.enabled=true]"),
     r"variant 'iled': .*'loss.balance.iled' must be > 0 with loss.balance.enabled"),
])
def test_bad_specs_get_one_line_before_any_training(tmp_path, change, message):
    spec = write_spec(tmp_path, GOOD.replace(*change))
    with pytest.raises(StudyError, match=message) as err:
        load_spec(spec)
    assert "\n" not in str(err.value)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fr_distill.cli", "study", str(spec), "--out",
                           str(out)], cwd=REPO, env=torchrun_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and not out.exists()


def test_a_spec_trains_on_a_list_of_sets(tmp_path, synthetic_data):
    from fr_distill.study.runner import plan_runs, prepare_data

    folder, rec = synthetic_data / "train", synthetic_data / "train.rec"
    body = GOOD.replace(GOOD[GOOD.index("data:"):GOOD.index("teacher:")],
                        f"data: {{train: [{folder}, {rec}], bin_sets: "
                        f"[{synthetic_data / 'synth_lfw.bin'}]}}\n")
    spec = load_spec(write_spec(tmp_path, body))
    assert spec.train == [str(folder), str(rec)]
    teacher, students = plan_runs(spec, prepare_data(spec, tmp_path / "out"), tmp_path / "out")
    assert all(run.config.data.train == [str(folder), str(rec)] for run in [teacher, *students])
    with pytest.raises(StudyError) as err:
        load_spec(write_spec(tmp_path, body.replace(str(rec), str(tmp_path / "gone"))))
    assert str(err.value).endswith(f"'data.train[1]' not found: {tmp_path / 'gone'}")


# ----------------------------------------------------------------------------------------------
# A reduced study end to end
# ----------------------------------------------------------------------------------------------
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
    with one more variant in the spec, and run with a changed student config."""
    spec = write_spec(root, GOOD + "  broken: [optim.lr=1e30, run.max_nonfinite_steps=1]\n")
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


def test_report_pools_every_set_for_the_mean_accuracy_interval():
    """``mean acc`` resamples the pairs of all sets: here set ``a`` differs on every pair and
    set ``b`` on none, so its difference is 50 points with a binomial-width interval, not set
    ``a``'s degenerate [100, 100]."""
    from types import SimpleNamespace

    from fr_distill.study.report import differences

    def model(a_correct: bool) -> SimpleNamespace:
        return SimpleNamespace(ok=True, outcomes={"ijb": {}, "bin": {
            "a": {"correct": np.full(200, a_correct)}, "b": {"correct": np.ones(200, bool)}}})

    spec = SimpleNamespace(baseline="none", seeds=[1], bootstrap=2000)
    diffs = differences(spec, model(True), {"none": {1: model(False)}})["teacher"]
    assert diffs["a acc"] == {"diff": 100.0, "ci95": [100.0, 100.0]}
    low, high = diffs["mean acc"]["ci95"]
    assert diffs["mean acc"]["diff"] == pytest.approx(50.0)
    half = 1.96 * 100 * np.sqrt(0.25 / 400)  # the share of drawn pairs from set a
    assert low == pytest.approx(50 - half, abs=1.0) and high == pytest.approx(50 + half, abs=1.0)


def test_settings_of_terms_a_run_does_not_use_do_not_make_it_another_run():
    """A default changed for a term that is off (here RPSD's anchor and ILED's weight in a run
    without them) leaves a finished run reusable; the same change in a run using them does not."""
    from fr_distill.config import load_config
    from fr_distill.study.runner import effective_settings

    plain = ["loss.iled.weight=0", "loss.rpsd.weight=0"]
    assert effective_settings(load_config(None, plain + ["loss.rpsd.student_anchor=student_bank",
                                                         "loss.balance.smoothing=0.3"])) == \
        effective_settings(load_config(None, plain + ["loss.rpsd.student_anchor=teacher_bank"]))
    assert effective_settings(load_config(None, ["loss.rpsd.student_anchor=student_bank"])) != \
        effective_settings(load_config(None, ["loss.rpsd.student_anchor=teacher_bank"]))
    assert effective_settings(load_config(None, plain + ["loss.l2.weight=1"])) != \
        effective_settings(load_config(None, plain))
