"""The study report: ``study.md``, ``study.json`` and the training-curve figures.

Per model and metric, the mean ± sample std over the seeds that finished; per variant (and
the teacher), the paired difference to the baseline with its 95 % bootstrap interval
(:mod:`fr_distill.study.stats`); the training curves of the loss terms, the student–teacher
cosine and the distillation terms' gradient share (METHOD D1), averaged over seeds; and the
failed runs with their log paths.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from fr_distill.eval.plots import plot_roc, pyplot
from fr_distill.eval.report import to_jsonable
from fr_distill.eval.roc import roc_curve
from fr_distill.study.runs import TEACHER, StudyRun
from fr_distill.study.spec import StudySpec
from fr_distill.study.stats import (accuracy, bootstrap_interval, mean_std,
                                    paired_bootstrap, tar_at_far_metric)

TAR_FARS = (1e-3, 1e-2)


# ----------------------------------------------------------------------------------------------
# Metrics of one run
# ----------------------------------------------------------------------------------------------
def run_metrics(run: StudyRun) -> dict[str, float]:
    """The table's numbers (%) of one evaluated run, from its ``results.json``."""
    metrics: dict[str, float] = {}
    accuracies = []
    for set_name, values in run.results.get("bin", {}).items():
        metrics[f"{set_name} acc"] = 100 * values["accuracy_mean"]
        accuracies.append(metrics[f"{set_name} acc"])
    if len(accuracies) > 1:
        metrics["mean acc"] = float(np.mean(accuracies))
    for set_name, values in run.results.get("ijb", {}).items():
        nearest = values["verification"]["nearest"]
        for far in TAR_FARS:
            metrics[f"{set_name} TAR@{far:g}"] = 100 * nearest[f"{far:g}"]
        if "identification" in values:
            metrics[f"{set_name} rank-1"] = 100 * values["identification"]["rank1"]
    return metrics


def read_curves(run: StudyRun) -> dict[str, dict[int, float]]:
    """``{key: {step: value}}`` of the training records in the run's ``metrics.jsonl``."""
    curves: dict[str, dict[int, float]] = defaultdict(dict)
    path = run.run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "eval" in record:
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                curves[key][record["step"]] = float(value)
    return dict(curves)


def mean_curves(runs: list[StudyRun]) -> dict[str, tuple[list[int], list[float]]]:
    """Curves averaged over ``runs`` at the steps every one of them logged."""
    per_run = [read_curves(r) for r in runs]
    keys = set.intersection(*(set(c) for c in per_run)) if per_run else set()
    averaged = {}
    for key in sorted(keys):
        steps = sorted(set.intersection(*(set(c[key]) for c in per_run)))
        averaged[key] = (steps, [float(np.mean([c[key][s] for c in per_run])) for s in steps])
    return averaged


# ----------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------
def unit_arrays(run: StudyRun, group: tuple[str, tuple[str, ...]]) -> dict[str, np.ndarray]:
    """The per-unit arrays of one unit group of ``run``: ``("bin", sets)``, the verdicts of
    the pairs of those sets concatenated; ``("ijb", (set,))``, its template pairs."""
    kind, names = group
    if kind == "bin":
        return {"correct": np.concatenate([run.outcomes["bin"][n]["correct"] for n in names])}
    pairs = run.outcomes["ijb"][names[0]]
    return {"scores": pairs["scores"], "labels": pairs["labels"]}


def bootstrap_metrics(run: StudyRun) -> dict[str, tuple]:
    """The metrics whose differences are bootstrapped: ``{label: (metric, unit group)}``.

    ``mean acc`` resamples the pairs of all bin sets together, each set's accuracy the pairs
    of that set, the IJB TARs the template pairs."""
    bins = tuple(sorted(run.outcomes["bin"]))
    metrics: dict[str, tuple] = {}
    if len(bins) > 1:
        metrics["mean acc"] = (accuracy, ("bin", bins))
    metrics.update({f"{name} acc": (accuracy, ("bin", (name,))) for name in bins})
    for name in sorted(run.outcomes["ijb"]):
        for far in TAR_FARS:
            metrics[f"{name} TAR@{far:g}"] = (tar_at_far_metric(far), ("ijb", (name,)))
    return metrics


def differences(spec: StudySpec, teacher: StudyRun, by_variant: dict[str, dict[int, StudyRun]]
                ) -> dict[str, dict[str, dict]]:
    """Paired differences to the baseline with 95 % intervals, per variant and the teacher.

    Only seeds where both the variant and the baseline finished are paired."""
    baseline = by_variant.get(spec.baseline, {})
    if not baseline:
        return {}
    reference = next(iter(baseline.values()))
    metrics = bootstrap_metrics(reference)
    out: dict[str, dict[str, dict]] = {}
    compared = {TEACHER: {seed: teacher for seed in baseline}} if teacher.ok else {}
    compared.update({v: runs for v, runs in by_variant.items() if v != spec.baseline})
    for variant, runs in compared.items():
        seeds = [s for s in spec.seeds if s in runs and s in baseline]
        if not seeds:
            continue
        out[variant] = {"seeds": seeds}
        for label, (metric, group) in metrics.items():
            interval = paired_bootstrap([unit_arrays(runs[s], group) for s in seeds],
                                        [unit_arrays(baseline[s], group) for s in seeds], metric,
                                        replicates=spec.bootstrap, seed=0)
            out[variant][label] = interval.as_dict()
    return out


def summarize(teacher: StudyRun, by_variant: dict[str, dict[int, StudyRun]],
              replicates: int) -> dict[str, dict]:
    """``{model: {metric: {mean, std, n}}}``, the end-of-training cosine included; the pooled
    accuracy (``mean acc``, or the one set's) also with its 95 % bootstrap interval over seeds
    and pairs (``ci95``)."""
    summary: dict[str, dict] = {}
    for name, runs in [(TEACHER, {0: teacher} if teacher.ok else {}), *by_variant.items()]:
        if not runs:
            continue
        per_seed = [run_metrics(r) for r in runs.values()]
        cosines = [read_curves(r).get("cosine") for r in runs.values()]
        metrics = {key: [m[key] for m in per_seed] for key in per_seed[0]}
        if name != TEACHER and all(cosines):
            metrics["cosine"] = [c[max(c)] for c in cosines]
        summary[name] = {key: dict(zip(("mean", "std"), mean_std(values)), n=len(values))
                         for key, values in metrics.items()}
        label, (metric, group) = next(iter(bootstrap_metrics(next(iter(runs.values()))).items()))
        interval = bootstrap_interval([unit_arrays(r, group) for r in runs.values()], metric,
                                      replicates)
        summary[name][label]["ci95"] = [interval.low, interval.high]
    return summary


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------
def plot_rocs(teacher: StudyRun, by_variant: dict[str, dict[int, StudyRun]], out: Path) -> list[Path]:
    """One ROC figure per IJB set: the teacher and each variant's first finished seed."""
    models = ([(TEACHER, teacher)] if teacher.ok else []) + [
        (variant, runs[min(runs)]) for variant, runs in by_variant.items() if runs]
    names = sorted({name for _, run in models for name in run.outcomes.get("ijb", {})})
    written = []
    for name in names:
        curves = {}
        for label, run in models:
            pairs = run.outcomes["ijb"][name]
            fpr, tpr, _ = roc_curve(pairs["scores"], pairs["labels"])
            curves[label] = (fpr, tpr)
        written.append(plot_roc(curves, out / f"roc_{name}.png", title=f"1:1 ROC on {name}"))
    return written


def plot_curves(by_variant: dict[str, dict[int, StudyRun]], out: Path) -> list[Path]:
    """Training curves averaged over seeds: loss terms, cosine, distillation gradient share."""
    curves = {v: mean_curves(list(runs.values())) for v, runs in by_variant.items() if runs}
    terms = sorted({k for c in curves.values() for k in c
                    if k in ("sphereface2", "iled", "rpsd", "l2", "fc", "rkd")})
    panels = [("loss_terms.png", "Unweighted loss terms", [(t, t) for t in terms]),
              ("cosine.png", "Student–teacher cosine", [("cosine", None)]),
              ("grad_share.png", "Gradient share of the distillation terms on f_s",
               [("grad_share/sphereface2", None)])]
    written = []
    plt = pyplot()
    for filename, title, keys in panels:
        figure, axes_list = plt.subplots(1, len(keys) or 1, figsize=(4.2 * max(1, len(keys)), 3.6),
                                         squeeze=False)
        for axes, (key, subtitle) in zip(axes_list[0], keys):
            for variant, c in curves.items():
                if key not in c:
                    continue
                steps, values = c[key]
                if key == "grad_share/sphereface2":
                    values = [1.0 - v for v in values]
                axes.plot(steps, values, lw=1.2, label=variant)
            axes.set_xlabel("step")
            axes.set_title(subtitle or title, fontsize=9)
            axes.grid(linestyle="--", linewidth=0.5)
            if key in ("sphereface2", "rpsd", "rkd", "l2"):
                axes.set_yscale("log")
        axes_list[0][0].legend(fontsize=7)
        figure.suptitle(title, fontsize=10)
        figure.tight_layout()
        figure.savefig(out / filename, dpi=110)
        plt.close(figure)
        written.append(out / filename)
    return written


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
def machine_description() -> str:
    """``<CPU model>, <N> cores, torch <version>, python <version>``: where a report was made."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}"


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "—"
    cell = f"{entry['mean']:.2f}" if entry["n"] == 1 else f"{entry['mean']:.2f} ± {entry['std']:.2f}"
    if "ci95" in entry:
        cell += f" [{entry['ci95'][0]:.2f}, {entry['ci95'][1]:.2f}]"
    return cell


def _diff_cell(entry: dict | None) -> str:
    if entry is None:
        return "—"
    low, high = entry["ci95"]
    return f"{entry['diff']:+.2f} [{low:+.2f}, {high:+.2f}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def markdown(spec: StudySpec, out: Path, summary: dict, diffs: dict, failed: list[StudyRun],
             figures: list[Path], wall_s: float, command: str, not_run: list[str] = ()) -> str:
    metrics = list(next(iter(summary.values())).keys()) if summary else []
    metrics = [m for m in metrics if m != "cosine"] + (["cosine"] if any(
        "cosine" in s for s in summary.values()) else [])
    lines = [f"# Study report: {spec.path.name}", "",
             f"- command: `{command}`",
             f"- machine: {machine_description()}",
             f"- finished: {datetime.datetime.now().isoformat(timespec='seconds')}, wall time of "
             f"this invocation {datetime.timedelta(seconds=int(wall_s))}",
             f"- seeds: {', '.join(map(str, spec.seeds))}; baseline: `{spec.baseline}`; "
             f"bootstrap replicates: {spec.bootstrap}", "",
             "## Results", "",
             "Mean ± sample standard deviation over the seeds that finished (the teacher is one "
             "run); in brackets, the 95 % bootstrap interval over seeds and pairs (METHOD S1). "
             "Accuracy: 10-fold verification accuracy (V1). TAR: nearest ROC point (V2). "
             "rank-1: 1:N identification (V3). cosine: mean student–teacher cosine over the "
             "last logging window. All in % except the cosine.", ""]
    lines += _table(["model", "seeds", *metrics], [
        [name, str(next(iter(entry.values()))["n"]), *(_cell(entry.get(m)) for m in metrics)]
        for name, entry in summary.items()])
    if diffs:
        diff_metrics = [k for k in next(iter(diffs.values())) if k != "seeds"]
        lines += ["", f"## Paired differences to `{spec.baseline}`", "",
                  "Difference in points (variant − baseline, mean over paired seeds) and its 95 % "
                  "bootstrap interval, resampling seeds and evaluation pairs (METHOD S1). TAR "
                  "here: the share of genuine pairs above the threshold that at most FAR of the "
                  "impostors pass.", ""]
        lines += _table(["model", "paired seeds", *diff_metrics], [
            [name, str(len(entry["seeds"])), *(_diff_cell(entry.get(m)) for m in diff_metrics)]
            for name, entry in diffs.items()])
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += _table(["run", "error", "log"], [[r.name, r.error, f"`{r.log}`"] for r in failed])
    if not_run:
        lines += ["", "## Runs not run", "",
                  "Written with `--report-only`: these runs of the spec were not trained; the same "
                  "command without it trains them and updates the report.", "",
                  ", ".join(not_run)]
    if figures:
        lines += ["", "## Figures", "",
                  "ROC: the teacher and each variant's first seed. Training curves: mean over seeds.",
                  ""]
        lines += [f"![{p.stem}]({p.name})" for p in figures]
    return "\n".join(lines) + "\n"


def write_report(spec: StudySpec, out: Path, teacher: StudyRun, students: list[StudyRun],
                 wall_s: float) -> dict:
    """Write ``study.md``, ``study.json`` and the figures into ``out``; return the JSON."""
    by_variant: dict[str, dict[int, StudyRun]] = {v: {} for v in spec.variants}
    for run in students:
        if run.ok:
            by_variant[run.variant][run.seed] = run
    summary = summarize(teacher, by_variant, spec.bootstrap)
    diffs = differences(spec, teacher, by_variant)
    failed = [r for r in [teacher, *students] if r.status == "failed"]
    figures = plot_rocs(teacher, by_variant, out) + plot_curves(by_variant, out)
    command = " ".join(["fr-distill", "study", *sys.argv[2:]]) if sys.argv[1:2] == ["study"] \
        else " ".join(sys.argv)
    report = {"spec": str(spec.path), "machine": machine_description(), "wall_s": wall_s,
              "seeds": spec.seeds, "baseline": spec.baseline, "summary": summary,
              "differences": diffs,
              "runs": [{"name": r.name, "variant": r.variant, "seed": r.seed, "status": r.status,
                        "error": r.error, "log": str(r.log), "run_dir": str(r.run_dir),
                        "metrics": run_metrics(r) if r.ok else None}
                       for r in [teacher, *students]]}
    (out / "study.json").write_text(json.dumps(to_jsonable(report), indent=2) + "\n")
    not_run = [r.name for r in students if r.status == "not run"]
    (out / "study.md").write_text(markdown(spec, out, summary, diffs, failed, figures, wall_s,
                                           command, not_run))
    return report
