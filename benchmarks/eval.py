"""IJB-C-scale scoring and `.bin` 10-fold timing, next to InsightFace's eval_ijbc.py procedure.

In one run, on the same random features (default: IJB-C sizes — 469,375 images, 23,124
templates, 15,658,489 pairs between 3,531 enrolment-side and 19,593 verification-side
templates as in the IJB-C 1:1 protocol; image features = subject centre + noise, so genuine
pairs score higher, by a
template-dependent margin), times each stage of
  * ``ours``      — :func:`fr_distill.eval.ijb.template_features`, :func:`pair_scores` and
                    :func:`tar_at_far` (torch, one sort for the ROC);
  * ``reference`` — InsightFace ``eval_ijbc.py``'s procedure: per-template ``np.where`` loops
                    with per-media means, pair scoring in 100k-pair numpy chunks, and
                    ``sklearn.metrics.roc_curve`` with the nearest-point TAR read-out;
with each stage's peak resident memory above the stage's start, the total ratio, and whether
the TAR values at FAR 1e-6…1e-1 are identical. Also the time of
:func:`fr_distill.eval.verification.evaluate` (10 folds) on 6,000 pairs. ``--json PATH``
writes the results.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np
import sklearn.preprocessing
import torch
from sklearn.metrics import roc_curve as sklearn_roc_curve

from fr_distill.eval.ijb import DEFAULT_FARS, pair_scores, tar_at_far, template_features
from fr_distill.eval.roc import roc_curve
from fr_distill.eval.verification import evaluate


class PeakMemory:
    """Peak resident set size above the start, sampled every 5 ms in a background thread."""

    def __enter__(self) -> "PeakMemory":
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * 4096

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.start) / 2 ** 20


def make_workload(images: int, templates: int, pairs: int, enrol: int, dim: int, seed: int):
    """Random IJB-C-like tables and float32 image features (see module doc)."""
    rng = np.random.default_rng(seed)
    subjects = enrol
    subject_of_template = np.concatenate([np.arange(enrol), rng.integers(0, subjects, templates - enrol)])
    template_of_image = np.sort(np.concatenate([np.arange(templates),
                                                rng.integers(0, templates, images - templates)]))
    medias = template_of_image * 4 + rng.integers(0, 4, images)
    centres = rng.standard_normal((subjects, dim), dtype=np.float32)
    feats = rng.standard_normal((images, dim), dtype=np.float32)
    feats *= rng.uniform(3.0, 14.0, templates).astype(np.float32)[template_of_image, None]
    feats += centres[subject_of_template[template_of_image]]
    verify = np.arange(enrol, templates)
    genuine_t1 = subject_of_template[verify]  # the enrolment template of the same subject
    impostors = pairs - len(verify)
    t1 = np.concatenate([genuine_t1, rng.integers(0, enrol, impostors)])
    t2 = np.concatenate([verify, rng.integers(enrol, templates, impostors)])
    labels = (subject_of_template[t1] == subject_of_template[t2]).astype(np.int64)
    return feats, template_of_image, medias, t1, t2, labels


def reference_pooling(img_feats, templates, medias):
    """InsightFace eval_ijbc.py's image2template_feature."""
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), img_feats.shape[1]))
    for count, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face_feats, face_medias = img_feats[ind_t], medias[ind_t]
        unique_medias, media_counts = np.unique(face_medias, return_counts=True)
        media_feats = []
        for media, count_m in zip(unique_medias, media_counts):
            (ind_m,) = np.where(face_medias == media)
            media_feats.append(face_feats[ind_m] if count_m == 1
                               else np.mean(face_feats[ind_m], axis=0, keepdims=True))
        template_feats[count] = np.sum(np.array(media_feats), axis=0)
    return sklearn.preprocessing.normalize(template_feats), unique_templates


def reference_scoring(template_feats, unique_templates, p1, p2):
    """InsightFace eval_ijbc.py's verification: 100k-pair chunks of gathered rows, numpy."""
    template2id = np.zeros((max(unique_templates) + 1, 1), dtype=int)
    template2id[unique_templates, 0] = np.arange(len(unique_templates))
    score = np.zeros((len(p1),))
    for start in range(0, len(p1), 100000):
        s = np.arange(start, min(start + 100000, len(p1)))
        feat1 = template_feats[template2id[p1[s]]]
        feat2 = template_feats[template2id[p2[s]]]
        score[s] = np.sum(feat1 * feat2, -1).flatten()
    return score


def reference_tar(scores, labels, fars):
    """InsightFace eval_ijbc.py's read-out: sklearn roc_curve, flipped, first nearest FPR."""
    fpr, tpr, _ = sklearn_roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    out = {}
    for far in fars:
        _, index = min(zip(abs(fpr - far), range(len(fpr))))
        out[far] = float(tpr[index])
    return out


def _timed(fn, *args):
    with PeakMemory() as memory:
        start = time.perf_counter()
        value = fn(*args)
        seconds = time.perf_counter() - start
    return value, {"seconds": seconds, "peak_extra_mib": memory.extra_mib}


def run_ours(feats, templates, medias, t1, t2, labels):
    stages = {}
    (ids, tfeats), stages["pooling"] = _timed(template_features, feats, templates, medias)
    scores, stages["scoring"] = _timed(pair_scores, ids, tfeats, t1, t2)
    tars, stages["roc_tar"] = _timed(tar_at_far, scores, labels)
    return scores, tars, stages


def run_reference(feats, templates, medias, t1, t2, labels):
    stages = {}
    (tfeats, ids), stages["pooling"] = _timed(reference_pooling, feats, templates, medias)
    scores, stages["scoring"] = _timed(reference_scoring, tfeats, ids, t1, t2)
    tars, stages["roc_tar"] = _timed(reference_tar, scores, labels, DEFAULT_FARS)
    return scores, tars, stages


def bin_tenfold_seconds(pairs: int, dim: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((2 * pairs, dim)).astype(np.float32)
    emb[1::2] += emb[0::2] * (rng.random(pairs) < 0.5)[:, None]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    issame = np.zeros(pairs, bool)
    start = time.perf_counter()
    evaluate(emb, issame | (np.einsum("ij,ij->i", emb[0::2], emb[1::2]) > 0.3))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="benchmark.py eval", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=469375)
    parser.add_argument("--templates", type=int, default=23124)
    parser.add_argument("--pairs", type=int, default=15658489)
    parser.add_argument("--enrol-templates", type=int, default=3531)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--bin-pairs", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-reference", action="store_true", help="time ours only")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    feats, templates, medias, t1, t2, labels = make_workload(
        args.images, args.templates, args.pairs, args.enrol_templates, args.dim, args.seed)
    ours_scores, ours_tars, ours = run_ours(feats, templates, medias, t1, t2, labels)
    results: dict = {"workload": {k: getattr(args, k) for k in ("images", "templates", "pairs",
                                                                  "enrol_templates", "dim")},
                     "torch_threads": torch.get_num_threads(), "ours": ours,
                     "ours_tar": {f"{k:g}": v for k, v in ours_tars["nearest"].items()},
                     "ours_tar_interpolated": {f"{k:g}": v for k, v in ours_tars["interpolated"].items()}}
    rows = [("ours", ours)]
    if not args.skip_reference:
        ref_scores, ref_tars, reference = run_reference(feats, templates, medias, t1, t2, labels)
        fpr, tpr, _ = roc_curve(ref_scores, labels)
        roc_on_reference_scores = tar_at_far(ref_scores, labels)["nearest"]
        results.update({
            "reference": reference,
            "reference_tar": {f"{k:g}": v for k, v in ref_tars.items()},
            "tar_identical": ours_tars["nearest"] == ref_tars,
            "roc_identical_on_reference_scores": roc_on_reference_scores == ref_tars,
            "max_abs_score_difference": float(np.abs(ours_scores - ref_scores).max()),
            "speedup": sum(s["seconds"] for s in reference.values())
                       / sum(s["seconds"] for s in ours.values()),
        })
        rows.append(("reference", reference))
    results["bin_10fold_seconds"] = bin_tenfold_seconds(args.bin_pairs, args.dim, args.seed)
    print(f"{'variant':<11}{'pooling s':>11}{'scoring s':>11}{'ROC+TAR s':>11}{'total s':>10}"
          f"{'peak MiB (pool/score/roc)':>28}")
    for name, stages in rows:
        total = sum(s["seconds"] for s in stages.values())
        peaks = "/".join(f"{s['peak_extra_mib']:.0f}" for s in stages.values())
        print(f"{name:<11}" + "".join(f"{s['seconds']:>11.2f}" for s in stages.values())
              + f"{total:>10.2f}{peaks:>28}")
    if "speedup" in results:
        print(f"speedup {results['speedup']:.1f}x; TAR@FAR identical: {results['tar_identical']} "
              f"(ROC on the reference scores identical: {results['roc_identical_on_reference_scores']}); "
              f"max |score difference| {results['max_abs_score_difference']:.1e}")
    print("TAR (nearest):", " ".join(f"{k}: {100 * v:.2f}" for k, v in results["ours_tar"].items()))
    print(f".bin 10-fold evaluation of {args.bin_pairs} pairs: {results['bin_10fold_seconds']:.2f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results
