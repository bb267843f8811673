"""Verification of a deployment file against the PyTorch model it was exported from.

Each file is loaded back (:func:`~fr_distill.deploy.artifacts.load_artifact`) and run on every
image of every verification `.bin` set, with the evaluation's own code: flip-fused features
(:func:`~fr_distill.eval.extract.extract_features`) and the 10-fold protocol
(:func:`~fr_distill.eval.verification.evaluate`, METHOD V1). It passes when, on every set,

* its features differ from the PyTorch model's by at most ``EMBEDDING_RTOL[precision]``
  relative (largest absolute difference over the largest absolute value; the state dict must
  reproduce them exactly), and
* its 10-fold accuracy differs from the PyTorch model's by at most the tolerance of its
  precision, in percentage points.

Otherwise :class:`ExportError` names the file, the set and the difference in one line.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fr_distill.eval.extract import EncodedImages, extract_features
from fr_distill.eval.verification import bin_set_name, evaluate, read_bin
from fr_distill.models.export import ExportError

from .artifacts import STATE_DICT, Format

EMBEDDING_RTOL = {"fp32": 1e-4, "fp16": 1e-2}
DEFAULT_ACCURACY_TOLERANCE = {"fp32": 0.0, "fp16": 0.05}
"""Largest accuracy difference to the PyTorch model, in points, per precision (flags
``--tolerance-fp32``/``--tolerance-fp16``)."""


@dataclass
class VerificationSet:
    """A `.bin` set (read once: its encoded images and flags) and the PyTorch model's
    flip-fused features and accuracy (%) on it."""

    name: str
    path: str
    payloads: list[bytes]
    issame: np.ndarray
    features: torch.Tensor
    accuracy: float


def _features(model: nn.Module, payloads: list[bytes], path: str,
              batch_size: int) -> torch.Tensor:
    return extract_features(model, EncodedImages(payloads, path), torch.device("cpu"),
                            batch_size, progress=False)


def accuracy_percent(features: torch.Tensor, issame: np.ndarray) -> float:
    """The 10-fold accuracy (METHOD V1) of flip-fused features, in %."""
    return 100.0 * evaluate(torch.nn.functional.normalize(features, dim=1), issame)["accuracy_mean"]


def reference_sets(model: nn.Module, paths: list[str], batch_size: int) -> list[VerificationSet]:
    """The PyTorch model's features and accuracy on each set of ``paths``."""
    sets = []
    for path in paths:
        payloads, issame = read_bin(path)
        features = _features(model, payloads, path, batch_size)
        sets.append(VerificationSet(bin_set_name(path), path, payloads, issame, features,
                                    accuracy_percent(features, issame)))
    return sets


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def embedding_bound(fmt: Format) -> float:
    """Largest relative feature difference allowed: 0 for the state dict, else by precision."""
    return 0.0 if fmt is STATE_DICT else EMBEDDING_RTOL[fmt.precision]


def verify_artifact(fmt: Format, module: nn.Module, sets: list[VerificationSet],
                    tolerance_points: float, batch_size: int) -> dict:
    """Check ``module`` (the file of ``fmt`` loaded back) on every set; returns its results
    ``{"embedding_rel_error": {set: e}, "accuracy": {set: %}, "accuracy_diff_points": {set: d}}``
    or raises :class:`ExportError` on the first set that fails."""
    bound = embedding_bound(fmt)
    results: dict = {"embedding_rel_error": {}, "accuracy": {}, "accuracy_diff_points": {}}
    for vset in sets:
        features = _features(module, vset.payloads, vset.path, batch_size)
        error = relative_error(features, vset.features)
        if not error <= bound:
            raise ExportError(f"{fmt.name} artifact {fmt.file}: its embeddings of {vset.name} differ "
                              f"from the PyTorch model's by {error:.2e} relative (> {bound:g})")
        accuracy = accuracy_percent(features, vset.issame)
        difference = accuracy - vset.accuracy
        if not abs(difference) <= tolerance_points:
            raise ExportError(f"{fmt.name} artifact {fmt.file}: accuracy on {vset.name} is "
                              f"{accuracy:.3f} %, the PyTorch model's {vset.accuracy:.3f} %: "
                              f"differs by {difference:+.3f} points (tolerance "
                              f"{tolerance_points:g})")
        results["embedding_rel_error"][vset.name] = error
        results["accuracy"][vset.name] = accuracy
        results["accuracy_diff_points"][vset.name] = difference
    return results
