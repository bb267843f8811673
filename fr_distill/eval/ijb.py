"""IJB-B / IJB-C scoring: template pooling, pair scores, TAR@FAR (METHOD V2) and 1:N search (V3).

Template pooling follows InsightFace's ``eval_ijbc.py``: the (flip-fused, optionally
faceness-weighted) image features of one media of a template are averaged, the media means
of the template are summed, and the sum is L2-normalized. The float32 sums run in the same
order as InsightFace's numpy loops (images in file order within a media, medias by id within
a template) and the normalization in float64, so template features match InsightFace's.

Pair scores are dot products of template features, computed in float64 chunks with torch on
the features' device. When the pairs form a dense enough bipartite block (IJB protocols pair
a few thousand enrolment templates with all verification templates) the block of scores is
one matrix product and the pairs are gathered from it; otherwise rows are gathered chunk by
chunk and multiplied row-wise.

Identification (V3) is open-set search: probes whose subject has a gallery template are
mated, the others non-mated. Rank-k counts mated probes whose mate is among the k best
gallery scores; TPIR at FPIR uses the threshold that at most ``FPIR·N_nonmated`` non-mated
probes' best scores exceed, and counts mated probes whose mate is rank 1 and above it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .errors import EvalDataError
from .roc import nearest_index, roc_curve, roc_curve_head, tar_interpolated, tar_nearest

DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _tensor(values, dtype=None, device=None) -> torch.Tensor:
    tensor = values if isinstance(values, torch.Tensor) else torch.from_numpy(np.asarray(values))
    return tensor.to(device=device if device is not None else tensor.device,
                     dtype=dtype if dtype is not None else tensor.dtype)


def unique_inverse(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(ids, return_inverse=True)``; by a presence table instead of a sort when
    the ids are non-negative and not much larger than their count (as IJB ids are)."""
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= 4 * ids.numel() + 2 ** 20:
        return torch.unique(ids, return_inverse=True)
    present = torch.zeros(int(ids.max()) + 1, dtype=torch.bool, device=ids.device)
    present[ids] = True
    rank = torch.cumsum(present, 0) - 1
    return torch.nonzero(present).reshape(-1), rank[ids]


def template_features(img_feats, templates, medias, faceness=None,
                      device=None) -> tuple[np.ndarray, torch.Tensor]:
    """Pool image features into L2-normalized template features (METHOD V2).

    ``img_feats`` ``[N, D]`` (numpy or torch, float32 flip-fused features), ``templates`` and
    ``medias`` ``[N]`` integer ids, ``faceness`` optional ``[N]`` weights multiplied in first.
    Returns ``(template_ids, template_feats)``: sorted unique ids (int64 numpy) and their
    float64 ``[T, D]`` features on ``device`` (default: the features' device).
    """
    feats = _tensor(img_feats, torch.float32, device)
    tmpl = _tensor(templates, torch.int64, feats.device).reshape(-1)
    media = _tensor(medias, torch.int64, feats.device).reshape(-1)
    if feats.ndim != 2 or not (feats.shape[0] == tmpl.numel() == media.numel()):
        raise ValueError(f"template_features: {tuple(feats.shape)} features for "
                         f"{tmpl.numel()} template and {media.numel()} media ids")
    if faceness is not None:
        weight = _tensor(faceness, torch.float32, feats.device).reshape(-1, 1)
        feats = feats * weight
    template_ids, template_of_image = unique_inverse(tmpl)
    _, media_rank = unique_inverse(media)
    group_key = template_of_image * (int(media_rank.max()) + 1) + media_rank
    group_ids, group_of_image = torch.unique(group_key, return_inverse=True)
    counts = torch.bincount(group_of_image, minlength=group_ids.numel()).to(torch.float32)
    media_means = torch.zeros(group_ids.numel(), feats.shape[1], dtype=torch.float32,
                              device=feats.device).index_add_(0, group_of_image, feats)
    media_means /= counts[:, None]
    template_of_group = group_ids // (int(media_rank.max()) + 1)
    sums = torch.zeros(template_ids.numel(), feats.shape[1], dtype=torch.float32,
                       device=feats.device).index_add_(0, template_of_group, media_means)
    pooled = sums.to(torch.float64)
    pooled /= torch.linalg.vector_norm(pooled, dim=1, keepdim=True)
    return template_ids.cpu().numpy(), pooled


def _rows_of(template_ids: torch.Tensor, wanted: torch.Tensor, name: str) -> torch.Tensor:
    """Row of each id of ``wanted`` in the sorted ``template_ids`` (a lookup table when the
    ids are small non-negative integers, else a binary search)."""
    largest = int(template_ids[-1])
    if int(template_ids[0]) >= 0 and largest < 4 * wanted.numel() + 2 ** 24:
        table = torch.full((largest + 2,), -1, dtype=torch.int64, device=wanted.device)
        table[template_ids] = torch.arange(template_ids.numel(), device=wanted.device)
        rows = table[wanted.clamp(min=-1, max=largest + 1)]
        missing = rows < 0
    else:
        rows = torch.searchsorted(template_ids, wanted).clamp_(max=template_ids.numel() - 1)
        missing = template_ids[rows] != wanted
    if missing.any():
        index = int(torch.nonzero(missing)[0])
        raise EvalDataError(f"pair_scores: {name}[{index}] = template {int(wanted[index])} "
                            "has no template feature")
    return rows


def pair_scores(template_ids, template_feats, t1, t2, chunk_size: int = 16384,
                max_dense_bytes: int = 2 ** 31) -> np.ndarray:
    """Dot products of the template features of pairs ``(t1[i], t2[i])`` (float64 numpy).

    ``template_ids`` sorted ``[T]`` and ``template_feats`` ``[T, D]`` as returned by
    :func:`template_features`; computed on ``template_feats``' device.
    """
    feats = _tensor(template_feats)
    ids = _tensor(template_ids, torch.int64, feats.device)
    first = _tensor(t1, torch.int64, feats.device).reshape(-1)
    second = _tensor(t2, torch.int64, feats.device).reshape(-1)
    if first.numel() != second.numel():
        raise ValueError(f"pair_scores: {first.numel()} t1 ids but {second.numel()} t2 ids")
    rows1, rows2 = _rows_of(ids, first, "t1"), _rows_of(ids, second, "t2")
    used1, pos1 = unique_inverse(rows1)
    used2, pos2 = unique_inverse(rows2)
    block = used1.numel() * used2.numel()
    if block <= 16 * first.numel() and block * feats.element_size() <= max_dense_bytes:
        scores = _dense_block_scores(feats[used1], feats[used2], chunk_size)
        return scores.view(-1)[pos1 * used2.numel() + pos2].cpu().numpy()
    out = torch.empty(first.numel(), dtype=feats.dtype, device=feats.device)
    for start in range(0, first.numel(), chunk_size):
        stop = min(start + chunk_size, first.numel())
        left = feats.index_select(0, rows1[start:stop])
        left.mul_(feats.index_select(0, rows2[start:stop]))
        torch.sum(left, dim=1, out=out[start:stop])
    return out.cpu().numpy()


def _dense_block_scores(left: torch.Tensor, right: torch.Tensor, rows_per_chunk: int) -> torch.Tensor:
    """``left @ right.T`` computed in row chunks into one preallocated matrix."""
    out = torch.empty(left.shape[0], right.shape[0], dtype=left.dtype, device=left.device)
    step = max(1, rows_per_chunk // 16)
    for start in range(0, left.shape[0], step):
        torch.matmul(left[start:start + step], right.T, out=out[start:start + step])
    return out


def tar_at_far(scores, labels, fars=DEFAULT_FARS) -> dict[str, dict[float, float]]:
    """TAR at each FAR, as InsightFace's nearest ROC point and interpolated on the ROC (V2).

    ``scores`` higher = more similar; ``labels`` 1 for genuine pairs. Values equal those read
    off ``sklearn.metrics.roc_curve``; only the head of the ROC up to twice the largest FAR
    is built unless a read-out touches its end.
    """
    fpr, tpr, cut = roc_curve_head(scores, labels, min(1.0, 2 * max(fars)))
    last = len(fpr) - 1
    if cut and any(nearest_index(fpr, far) == last or np.searchsorted(fpr, far, "right") >= last
                   for far in fars):
        fpr, tpr, _ = roc_curve(scores, labels)
    return {"nearest": {far: tar_nearest(fpr, tpr, far) for far in fars},
            "interpolated": {far: tar_interpolated(fpr, tpr, far) for far in fars}}


def identification(gallery_feats, gallery_ids, probe_feats, probe_ids, ranks=(1, 5, 10),
                   fpirs=(1e-2, 1e-1), chunk_size: int = 4096) -> dict:
    """Open-set 1:N search of probe templates against gallery templates (METHOD V3).

    Features are L2-normalized template features (``[G, D]``, ``[P, D]``), ids are subject ids.
    Returns ``{"rank1": …, "rank5": …, "rank10": …, "tpir_at_fpir": {fpir: tpir},
    "mated": n, "nonmated": n}``; TPIR entries are NaN when there are no non-mated probes.
    """
    gallery = _tensor(gallery_feats, torch.float64)
    probes = _tensor(probe_feats, torch.float64, gallery.device)
    g_ids = _tensor(gallery_ids, torch.int64, gallery.device).reshape(-1)
    p_ids = _tensor(probe_ids, torch.int64, gallery.device).reshape(-1)
    if gallery.shape[0] != g_ids.numel() or probes.shape[0] != p_ids.numel():
        raise ValueError("identification: features and ids differ in length")
    mate_rank, mate_score, best_score = [], [], []
    for start in range(0, probes.shape[0], chunk_size):
        sims = probes[start:start + chunk_size] @ gallery.T
        is_mate = p_ids[start:start + chunk_size, None] == g_ids[None, :]
        mate = torch.where(is_mate, sims, torch.full_like(sims, -math.inf)).amax(dim=1)
        others = torch.where(is_mate, torch.full_like(sims, -math.inf), sims)
        mate_rank.append((others > mate[:, None]).sum(dim=1) + 1)
        mate_score.append(mate)
        best_score.append(sims.amax(dim=1))
    rank, mate_s, best = torch.cat(mate_rank), torch.cat(mate_score), torch.cat(best_score)
    mated = torch.isfinite(mate_s)
    n_mated, n_nonmated = int(mated.sum()), int((~mated).sum())
    if n_mated == 0:
        raise ValueError("identification: no probe has a mate in the gallery")
    result: dict = {f"rank{k}": float((rank[mated] <= k).sum()) / n_mated for k in ranks}
    nonmated_best = torch.sort(best[~mated], descending=True).values
    tpir = {}
    for fpir in fpirs:
        if n_nonmated == 0:
            tpir[fpir] = math.nan
            continue
        allowed = int(math.floor(fpir * n_nonmated + 1e-9))
        threshold = nonmated_best[allowed] if allowed < n_nonmated else -math.inf
        hit = mated & (rank == 1) & (mate_s > threshold)
        tpir[fpir] = float(hit.sum()) / n_mated
    result["tpir_at_fpir"] = tpir
    result["mated"], result["nonmated"] = n_mated, n_nonmated
    return result
