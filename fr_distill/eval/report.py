"""Presenting evaluation results: console table, JSON file, TensorBoard scalars.

Results are nested dicts ``{"bin": {set: metrics}, "ijb": {set: {...}}, "tinyface": {set:
{...}}}`` as returned by
:func:`fr_distill.eval.runner.evaluate_model`; rates are fractions, shown as percentages.
"""
from __future__ import annotations

import json
import math
from pathlib import Path


def to_jsonable(value):
    if isinstance(value, dict):
        return {(f"{k:g}" if isinstance(k, float) else str(k)): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(results: dict, path: str | Path) -> Path:
    """Write ``results`` as JSON (float keys such as FARs become strings like ``"1e-05"``)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(to_jsonable(results), indent=2, sort_keys=True) + "\n")
    return Path(path)


def flat_scalars(results: dict) -> dict[str, float]:
    """``{"lfw/accuracy_mean": …, "IJBC/tar_nearest@1e-05": …, …}`` for logging."""
    scalars: dict[str, float] = {}
    for name, metrics in results.get("bin", {}).items():
        for key, value in metrics.items():
            scalars[f"{name}/{key}"] = float(value)
    for name, ijb in results.get("ijb", {}).items():
        verification = ijb.get("verification", {})
        for method in ("nearest", "interpolated"):
            for far, tar in verification.get(method, {}).items():
                scalars[f"{name}/tar_{method}@{far:g}"] = float(tar)
        if "auc" in verification:
            scalars[f"{name}/auc"] = float(verification["auc"])
        for key, value in ijb.get("identification", {}).items():
            if isinstance(value, dict):
                for fpir, tpir in value.items():
                    scalars[f"{name}/{key}@{fpir:g}"] = float(tpir)
            elif key.startswith("rank"):
                scalars[f"{name}/{key}"] = float(value)
    for name, ranks in results.get("tinyface", {}).items():
        scalars.update({f"{name}/{key}": float(value) for key, value in ranks.items()
                        if key.startswith("rank")})
    return scalars


def log_scalars(writer, results: dict, step: int, prefix: str = "eval") -> None:
    """Add every scalar of :func:`flat_scalars` to a TensorBoard ``SummaryWriter``."""
    for key, value in flat_scalars(results).items():
        if math.isfinite(value):
            writer.add_scalar(f"{prefix}/{key}", value, step)
    writer.flush()


def format_table(results: dict) -> str:
    """A plain-text table of the results (percentages)."""
    lines = []
    bins = results.get("bin", {})
    if bins:
        header = f"{'set':<14}{'acc':>16}{'best-thr acc':>14}{'EER':>8}{'AUC':>9}{'VAL@1e-3':>10}"
        lines += [header, "-" * len(header)]
        for name, m in bins.items():
            lines.append(f"{name:<14}{100 * m['accuracy_mean']:>9.3f} ± {100 * m['accuracy_std']:<4.2f}"
                         f"{100 * m['best_threshold_accuracy']:>14.3f}{100 * m['eer']:>8.3f}"
                         f"{100 * m['auc']:>9.3f}{100 * m['val_at_far_1e-3']:>10.3f}")
    for name, ijb in results.get("ijb", {}).items():
        verification = ijb["verification"]
        fars = list(verification["nearest"])
        header = f"{name + ' TAR@FAR':<22}" + "".join(f"{far:>9.0e}" for far in fars)
        lines += ["", header, "-" * len(header)]
        for method in ("nearest", "interpolated"):
            lines.append(f"{method:<22}" + "".join(f"{100 * verification[method][far]:>9.2f}"
                                                     for far in fars))
        ident = ijb.get("identification")
        if ident:
            tpir = "  ".join(f"TPIR@FPIR={fpir:g}: {100 * v:.2f}"
                             for fpir, v in ident["tpir_at_fpir"].items())
            lines.append(f"1:N rank-1 {100 * ident['rank1']:.2f}  rank-5 {100 * ident['rank5']:.2f}"
                         f"  rank-10 {100 * ident['rank10']:.2f}  {tpir}")
    for name, tiny in results.get("tinyface", {}).items():
        lines += ["", f"{name} 1:N rank-1 {100 * tiny['rank1']:.2f}  rank-5 {100 * tiny['rank5']:.2f}"
                      f"  rank-20 {100 * tiny['rank20']:.2f}  ({tiny['probes']} probes; gallery "
                      f"{tiny['gallery_match']} matches + {tiny['distractors']} distractors)"]
    return "\n".join(lines)
