"""Evaluation runs: `.bin` sets (V1), IJB sets (V2, V3) and TinyFace (V4) for any loadable model.

:func:`evaluate_bin_sets` is the trainer's periodic evaluation; :func:`evaluate_model` adds
folders of aligned faces scored as `.bin` sets (:mod:`.folder`), the IJB sets, TinyFace, the
ROC figures and the JSON/console report (the body of ``fr-distill eval``,
:mod:`fr_distill.commands.eval`).
All ranks call these; images are sharded across ranks, scores computed on rank 0 and the
results returned on every rank.
"""
from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from fr_distill import dist
from fr_distill.config import ConfigError

from .dali_align import DaliAlignedImages
from .errors import EvalDataError
from .extract import (SHARD_SIZE, AlignedImages, EncodedImages, extract_features, prepare_cache,
                      shard_bounds)
from .ijb import identification, pair_scores, tar_at_far, template_features
from .ijb_meta import IJBMeta, load_ijb_meta
from .plots import plot_roc
from .report import log_scalars, write_json
from .roc import roc_curve
from .tinyface import ResizedImages, load_tinyface, score_tinyface
from .verification import METRICS, PairSet, bin_pair_set, bin_set_name, evaluate, read_bin


def check_bin_sets(paths: list[str], best_metric: str = "") -> None:
    """Pre-flight of the trainer's evaluation (``eval.bin_sets``, ``eval.best_metric``), so that
    a bad set stops the run before training, not at its first evaluation: every `.bin` is
    read and every image decoded (one line naming the file and image otherwise), the set
    names are distinct, and ``best_metric`` is one of the metrics the sets will produce."""
    first_of: dict[str, int] = {}
    for i, path in enumerate(paths):
        payloads, _ = read_bin(path)
        images = EncodedImages(payloads, path)
        for start, stop in shard_bounds(len(images), 1024):
            images.load(start, stop)
        name = bin_set_name(path)
        if name in first_of:
            raise EvalDataError(f"eval.bin_sets[{i}] {path}: same set name '{name}' as "
                                f"eval.bin_sets[{first_of[name]}]; their results would collide")
        first_of[name] = i
    known = [f"{name}/{metric}" for name in first_of for metric in METRICS]
    if best_metric and best_metric not in known:
        close = difflib.get_close_matches(best_metric, known, n=1, cutoff=0.6)
        hint = (f"did you mean '{close[0]}'?" if close else
                f"one of {', '.join(known)}" if known else "eval.bin_sets is empty")
        raise ConfigError(f"config key 'eval.best_metric' is '{best_metric}', which no "
                          f"evaluation produces; {hint}")


def evaluate_bin_sets(model: torch.nn.Module, paths: list[str], device, batch_size: int = 128,
                      amp_dtype: torch.dtype | None = None, cache_root: str | Path | None = None,
                      cache_key: dict | None = None, progress: bool = False,
                      shard_size: int = SHARD_SIZE, outcomes: dict | None = None) -> dict[str, dict]:
    """V1 metrics of ``model`` on each `.bin` in ``paths``: ``{set name: metrics}`` on every rank
    (:func:`evaluate_pair_sets`; each file is read when its turn comes)."""
    return evaluate_pair_sets(model, (bin_pair_set(path) for path in paths), device, batch_size,
                              amp_dtype, cache_root, cache_key, progress, shard_size, outcomes)


def evaluate_pair_sets(model: torch.nn.Module, sets: Iterable[PairSet], device,
                       batch_size: int = 128, amp_dtype: torch.dtype | None = None,
                       cache_root: str | Path | None = None, cache_key: dict | None = None,
                       progress: bool = False, shard_size: int = SHARD_SIZE,
                       outcomes: dict | None = None) -> dict[str, dict]:
    """V1 metrics of ``model`` on each pair set (`.bin` or folder): ``{set name: metrics}``.

    With ``outcomes``, ``outcomes[set name]`` receives the per-pair verdicts of
    :func:`~fr_distill.eval.verification.evaluate` (``{"correct": bool [N]}``).

    With ``cache_root`` the features of each set are cached per shard under
    ``cache_root/<set>`` (keyed by ``cache_key`` and the set's ``cache_id``), so an interrupted
    run resumes. A DDP wrapper is looked through: ranks run different numbers of forward passes
    here, which DDP's per-forward buffer broadcast would turn into a hang.
    """
    if isinstance(model, DistributedDataParallel):
        model = model.module
    was_training = model.training
    model.eval()
    results = {}
    try:
        for pair_set in sets:
            name = pair_set.name
            cache = None if cache_root is None else prepare_cache(
                Path(cache_root) / name, {**(cache_key or {}), "set": pair_set.cache_id})
            feats = extract_features(model, EncodedImages(pair_set.payloads, pair_set.source),
                                     device, batch_size, amp_dtype, cache, shard_size, progress,
                                     name)
            pairs = outcomes.setdefault(name, {}) if outcomes is not None else None
            results[name] = evaluate(torch.nn.functional.normalize(feats, dim=1),
                                     pair_set.issame, outcomes=pairs)
    finally:
        model.train(was_training)
    return results


TINYFACE = "TinyFace"
"""The set name of TinyFace results (``results["tinyface"]["TinyFace"]``, scalars ``TinyFace/rank1``)."""


def _score_device(device: torch.device) -> torch.device:
    return device if device.type == "cuda" else torch.device("cpu")


def score_ijb(meta: IJBMeta, feats: torch.Tensor, device: torch.device,
              use_faceness: bool = True, outcomes: dict | None = None
              ) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """V2 and V3 results of image features ``feats`` on one IJB set; also the ROC ``(fpr, tpr)``.

    With ``outcomes``, ``outcomes["scores"]``/``["labels"]`` receive the template pairs' scores
    and labels (numpy), the per-pair data of V2.

    1:N protocol: rank-1/5/10 search the mixed probe templates in the combined gallery
    (G1+G2, or S1+S2), where every probe has its mate, as InsightFace's ``ijb_1n.py`` does.
    TPIR at FPIR is open-set, as in the IJB-B/IJB-C protocol papers: each gallery is searched
    on its own, so the probes of subjects enrolled in the other gallery are its non-mated
    searches; the reported value is the mean over the two galleries (each also reported as
    ``tpir_at_fpir_<gallery>``).
    """
    ids, tfeats = template_features(feats.to(_score_device(device)), meta.templates, meta.medias,
                                    meta.faceness if use_faceness else None)
    scores = pair_scores(ids, tfeats, meta.t1, meta.t2)
    if outcomes is not None:
        outcomes["scores"] = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) \
            else np.asarray(scores)
        outcomes["labels"] = np.asarray(meta.labels).astype(bool)
    fpr, tpr, _ = roc_curve(scores, meta.labels)
    verification = tar_at_far(scores, meta.labels)
    verification["auc"] = float(np.trapezoid(tpr, fpr))
    result: dict = {"verification": verification}
    if meta.probes is not None:
        rows = {t: i for i, t in enumerate(ids.tolist())}

        def feats_of(template_ids: np.ndarray) -> torch.Tensor:
            return tfeats[torch.as_tensor([rows[t] for t in template_ids.tolist()],
                                          device=tfeats.device)]

        probe_ids, probe_subjects = meta.probes
        probe_feats = feats_of(probe_ids)
        gallery_ids = np.concatenate([g[0] for g in meta.galleries.values()])
        gallery_subjects = np.concatenate([g[1] for g in meta.galleries.values()])
        combined = identification(feats_of(gallery_ids), gallery_subjects, probe_feats,
                                  probe_subjects)
        per_gallery = {name: identification(feats_of(g_ids), g_subjects, probe_feats, probe_subjects)
                       for name, (g_ids, g_subjects) in meta.galleries.items()}
        fpirs = combined["tpir_at_fpir"].keys()
        result["identification"] = {
            "rank1": combined["rank1"], "rank5": combined["rank5"], "rank10": combined["rank10"],
            "tpir_at_fpir": {f: float(np.mean([g["tpir_at_fpir"][f] for g in per_gallery.values()]))
                             for f in fpirs},
            **{f"tpir_at_fpir_{name}": g["tpir_at_fpir"] for name, g in per_gallery.items()},
        }
    return result, (fpr, tpr)


def aligned_images(meta: IJBMeta, device: torch.device, aligner: str = "auto"):
    """The loose crops of ``meta`` aligned by DALI (``dali``; on GPUs by default when DALI is
    installed) or by numpy (``numpy``)."""
    if aligner == "auto":
        aligner = "dali" if device.type == "cuda" and importlib.util.find_spec("nvidia.dali") else "numpy"
    if aligner == "dali":
        gpu = device.type == "cuda"
        return DaliAlignedImages(meta.image_paths, meta.landmarks, device="gpu" if gpu else "cpu",
                                 device_id=device.index or 0)
    return AlignedImages(meta.image_paths, meta.landmarks)


def evaluate_model(model: torch.nn.Module, device, bin_paths: list[str] = (),
                   ijb_sets: list[tuple[str, str]] = (), out_dir: str | Path | None = None,
                   batch_size: int = 128, amp_dtype: torch.dtype | None = None,
                   use_faceness: bool = True, cache_key: dict | None = None, writer=None,
                   step: int = 0, shard_size: int = SHARD_SIZE, aligner: str = "auto",
                   roc_curves: dict | None = None, outcomes: dict | None = None,
                   pair_sets: Sequence[PairSet] = (),
                   tinyface: str | Path | None = None) -> dict:
    """Evaluate ``model`` on `.bin` sets, IJB sets ``[(root, name)]`` (METHOD V1–V3) and the
    TinyFace release at ``tinyface`` (V4; read before any image is, so a bad one stops first).

    ``pair_sets`` (folders of aligned faces, :mod:`fr_distill.eval.folder`) are scored after
    the `.bin` sets and reported as `.bin` sets are, under ``results["bin"]``.

    With ``out_dir``: per-shard feature caches under ``out_dir/features``, ``results.json``
    and ``roc_<name>.png`` per IJB set (rank 0). With a TensorBoard ``writer``: scalars at
    ``step`` (rank 0). With ``roc_curves``, rank 0 stores each IJB set's ROC ``(fpr, tpr)``
    there under the set's name (to draw several models on one figure). With ``outcomes``,
    rank 0 stores the per-unit data a bootstrap resamples: ``outcomes["bin"][set]`` as in
    :func:`evaluate_bin_sets`, ``outcomes["ijb"][name]`` the template-pair ``scores`` and
    ``labels`` of V2. Returns the results on every rank.
    """
    device = torch.device(device)
    tinyface_release = load_tinyface(tinyface) if tinyface is not None else None
    out = Path(out_dir) if out_dir is not None else None
    features_root = out / "features" if out is not None else None
    bin_outcomes = outcomes.setdefault("bin", {}) if outcomes is not None else None
    sets = chain((bin_pair_set(path) for path in bin_paths), pair_sets)
    results: dict = {"bin": evaluate_pair_sets(model, sets, device, batch_size, amp_dtype,
                                               features_root, cache_key, True, shard_size,
                                               bin_outcomes)}
    if ijb_sets:
        results["ijb"] = {}
    model.eval()
    for root, name in ijb_sets:
        meta = load_ijb_meta(root, name)
        cache = None if features_root is None else prepare_cache(
            features_root / name, {**(cache_key or {}), "set": str(root), "name": name,
                                   "aligner": aligner})
        feats = extract_features(model, aligned_images(meta, device, aligner), device,
                                 batch_size, amp_dtype, cache, shard_size, desc=name)
        scored = None
        if dist.is_main():
            pairs = outcomes.setdefault("ijb", {}).setdefault(name, {}) \
                if outcomes is not None else None
            scored = score_ijb(meta, feats, device, use_faceness, pairs)
            if roc_curves is not None:
                roc_curves[name] = scored[1]
            if out is not None:
                plot_roc({name: scored[1]}, out / f"roc_{name}.png", title=f"ROC on {name}")
        results["ijb"][name] = dist.broadcast_object(scored[0] if scored else None)
    if tinyface_release is not None:
        cache = None if features_root is None else prepare_cache(
            features_root / TINYFACE, {**(cache_key or {}), "set": str(tinyface)})
        feats = extract_features(model, ResizedImages(tinyface_release.image_paths), device,
                                 batch_size, amp_dtype, cache, shard_size, desc=TINYFACE)
        scored = score_tinyface(tinyface_release, feats, _score_device(device)) \
            if dist.is_main() else None
        results["tinyface"] = {TINYFACE: dist.broadcast_object(scored)}
    if dist.is_main():
        if out is not None:
            write_json(results, out / "results.json")
        if writer is not None:
            log_scalars(writer, results, step)
    return results
