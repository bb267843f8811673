"""Writers of the synthetic data set's files: the training folder and RecordIO pair, the
verification ``.bin`` sets (METHOD V1) and the IJB-style release (METHOD V2, V3).

Every image is produced by a :class:`RenderJob` (a batch of identity latents, conditions and
output transforms plus the seed of its noise), rendered and JPEG-encoded by
:func:`run_jobs` in worker processes; the planning of what to render — and therefore every
byte written — depends only on the generator's arguments, never on the number of workers.
"""
from __future__ import annotations

import csv
import ctypes
import ctypes.util
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import simplejpeg
from PIL import Image

from fr_distill.data.recordio import RecordIOWriter
from fr_distill.eval.verification import PairSet, write_bin as write_pairs

from . import faces

CSV_COLUMNS = ("TEMPLATE_ID", "SUBJECT_ID", "FILENAME", "SIGHTING_ID",
               "FACE_X", "FACE_Y", "FACE_WIDTH", "FACE_HEIGHT")
"""Columns of the 1:N gallery/probe files, as in IJB-C's ``ijbc_1N_*.csv`` protocol files."""


@dataclass
class RenderJob:
    """One batch to render: ``B`` latents, conditions, aligned-frame → pixel maps ``[B, 3, 3]``.

    Images are rendered on a ``size × size`` canvas; ``crop`` (per image) keeps the top-left
    ``crop[i] × crop[i]`` part (loose crops of varying size), ``None`` keeps the whole canvas;
    ``shrink`` (per image ``(width, height)``) then resizes it down with PIL's antialiasing
    bilinear filter (low-resolution faces).
    """

    latent: np.ndarray
    cond: dict[str, np.ndarray]
    to_pixels: np.ndarray
    size: int
    seed: tuple[int, ...]
    quality: int
    crop: np.ndarray | None = None
    shrink: np.ndarray | None = None


def render_job(job: RenderJob) -> list[bytes]:
    """Render and JPEG-encode one job (runs in a worker process)."""
    rng = np.random.default_rng(list(job.seed))
    images = faces.render(job.latent, job.cond, job.to_pixels, job.size, job.size, rng)
    out = []
    for i, img in enumerate(images):
        if job.crop is not None:
            img = img[:job.crop[i], :job.crop[i]]
        if job.shrink is not None:
            size = (int(job.shrink[i][0]), int(job.shrink[i][1]))
            img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR))
        out.append(simplejpeg.encode_jpeg(np.ascontiguousarray(img), quality=job.quality,
                                          colorspace="RGB"))
    return out


def _keep_heap() -> None:
    """Worker initializer: keep freed memory in the heap (glibc ``mallopt``).

    Rendering allocates many multi-megabyte temporaries; with glibc's defaults each comes
    from a fresh ``mmap`` and page-faults on first touch, which costs about a third of the
    render time in kernel work. Raising the mmap and trim thresholds reuses the heap instead.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_trim_threshold, 1 << 30)
    mallopt(m_mmap_threshold, 1 << 25)  # glibc's largest accepted value (32 MiB)


def run_jobs(jobs: Sequence[RenderJob], workers: int) -> Iterator[list[bytes]]:
    """Results of ``jobs`` in order, rendered by ``workers`` forked processes (1: in-process)."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(render_job, jobs)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(min(workers, len(jobs)), initializer=_keep_heap) as pool:
        yield from pool.imap(render_job, jobs, chunksize=1)


def subset(cond: dict[str, np.ndarray], index: np.ndarray | slice) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in cond.items()}


def concat(conds: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    conds = list(conds)
    return {k: np.concatenate([c[k] for c in conds]) for k in conds[0]}


# --------------------------------------------------------------------------------------
# training set: folder layout and InsightFace RecordIO
# --------------------------------------------------------------------------------------
def train_jobs(latent: np.ndarray, images_per_identity: int, seed: int, quality: int,
               batch_images: int = 64) -> list[RenderJob]:
    """Jobs for the training images: identity ``i``'s images are rows ``i·K … i·K+K-1``."""
    num, k = len(latent), images_per_identity
    per_job = max(1, batch_images // k)
    jobs = []
    for start in range(0, num, per_job):
        ids = range(start, min(num, start + per_job))
        cond = concat(faces.sample_conditions(np.random.default_rng([seed, 2, i]), k, faces.TRAIN)
                      for i in ids)
        jobs.append(RenderJob(np.repeat(latent[ids.start:ids.stop], k, axis=0), cond,
                              faces.pose_matrix(cond), 112, (seed, 3, start), quality))
    return jobs


def write_train(out_dir: Path, jobs: Sequence[RenderJob], num_identities: int,
                images_per_identity: int, workers: int) -> int:
    """Write ``train/<identity>/<k>.jpg`` and ``train.rec``/``train.idx`` with the same images.

    The RecordIO pair has InsightFace's layout: the header record (id 0) with label
    ``(N·K+1, N·K+1+N)``, image records ids ``1..N·K`` labelled with the identity, then one
    record per identity whose labels are its ``(first id, end id)``. Identity folders are
    zero-padded so their sorted order is the label order. Returns the number of images.
    """
    k = images_per_identity
    total = num_identities * k
    width = max(5, len(str(num_identities - 1)))
    header = (float(total + 1), float(total + 1 + num_identities))
    root = out_dir / "train"
    index = 0
    with RecordIOWriter(out_dir / "train.rec", out_dir / "train.idx", header_label=header) as rec:
        for encoded in run_jobs(jobs, workers):
            for data in encoded:
                identity, image = divmod(index, k)
                folder = root / f"{identity:0{width}d}"
                if image == 0:
                    folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{image:04d}.jpg").write_bytes(data)
                rec.write(identity, data)
                index += 1
        if index != total:
            raise RuntimeError(f"{out_dir}: rendered {index} training images, expected {total}")
        for identity in range(num_identities):
            first = 1 + identity * k
            rec.write(first, b"", extra_labels=(first + k,))
    return total


# --------------------------------------------------------------------------------------
# verification sets (.bin)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BinSpec:
    """A verification set: conditions of each pair's first and second image, and the share of
    negative pairs drawn from the same family (hard negatives)."""

    name: str
    first: faces.Difficulty
    second: faces.Difficulty
    hard_negatives: float


BIN_SETS = (
    BinSpec("synth_lfw", faces.FRONTAL, faces.FRONTAL, 0.2),
    BinSpec("synth_cfp", faces.FRONTAL, faces.PROFILE, 0.5),
)


def plan_pairs(rng: np.random.Generator, num_pairs: int, num_identities: int, family_size: int,
               hard_negatives: float) -> tuple[np.ndarray, np.ndarray]:
    """Identity pairs ``[P, 2]`` and ``issame`` ``[P]``: pairs alternate positive, negative.

    Negatives are family-mates with probability ``hard_negatives`` (when the family has
    several members), else identities of another family.
    """
    issame = np.arange(num_pairs) % 2 == 0
    first = rng.integers(0, num_identities, num_pairs)
    second = first.copy()
    hard = rng.random(num_pairs) < hard_negatives
    for i in np.flatnonzero(~issame):
        family = first[i] // family_size
        members = np.arange(family * family_size, min((family + 1) * family_size, num_identities))
        mates = members[members != first[i]]
        if hard[i] and len(mates):
            second[i] = rng.choice(mates)
        else:
            others = np.setdiff1d(np.arange(num_identities), members)
            second[i] = rng.choice(others) if len(others) else rng.choice(mates)
    return np.stack([first, second], axis=1), issame


def bin_jobs(spec_index: int, spec: BinSpec, latent: np.ndarray, num_pairs: int,
             family_size: int, seed: int, quality: int,
             batch_images: int = 64) -> tuple[list[RenderJob], list[bool]]:
    """Jobs rendering the ``2·num_pairs`` aligned images of one set, and its ``issame`` list."""
    rng = np.random.default_rng([seed, 5, spec_index])
    pairs, issame = plan_pairs(rng, num_pairs, len(latent), family_size, spec.hard_negatives)
    cond_a = faces.sample_conditions(rng, num_pairs, spec.first)
    cond_b = faces.sample_conditions(rng, num_pairs, spec.second)
    order = np.stack([np.arange(num_pairs), num_pairs + np.arange(num_pairs)], axis=1).ravel()
    cond = subset(concat([cond_a, cond_b]), order)  # image 2k, 2k+1 = pair k
    ids = pairs.ravel()
    jobs = []
    for start in range(0, len(ids), batch_images):
        rows = slice(start, start + batch_images)
        part = subset(cond, rows)
        jobs.append(RenderJob(latent[ids[rows]], part, faces.pose_matrix(part), 112,
                              (seed, 6, spec_index, start), quality))
    return jobs, [bool(x) for x in issame]


def write_bin(path: Path, jobs: Sequence[RenderJob], issame: list[bool], workers: int) -> int:
    """Write an InsightFace ``.bin`` (pickle of ``(bins, issame_list)``) through the
    evaluation's writer (:func:`fr_distill.eval.verification.write_bin`), replacing ``path``."""
    bins = [data for encoded in run_jobs(jobs, workers) for data in encoded]
    if len(bins) != 2 * len(issame):
        raise RuntimeError(f"{path}: rendered {len(bins)} images for {len(issame)} pairs")
    write_pairs(PairSet(path.stem, str(path), bins, np.asarray(issame, dtype=bool), ""), path,
                overwrite=True)
    return len(issame)


# --------------------------------------------------------------------------------------
# IJB-style release
# --------------------------------------------------------------------------------------
@dataclass
class IJBPlan:
    """Templates, media and loose-crop images of the IJB-style release (all 1-based ids)."""

    subject: np.ndarray  # per template: subject id
    is_gallery: np.ndarray  # per template
    image_template: np.ndarray  # per image: template id
    image_media: np.ndarray  # per image: media id
    jobs: list[RenderJob]
    landmarks: np.ndarray  # [I, 5, 2] loose-crop pixels
    truth: np.ndarray  # [I, 2, 3] loose crop -> aligned 112×112 frame
    boxes: np.ndarray  # [I, 4] x, y, w, h
    faceness: np.ndarray  # [I]


def loose_placement(rng: np.random.Generator, num: int, min_size: int,
                    max_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop sizes ``[n]`` and aligned-frame → loose-crop similarities ``[n, 3, 3]``: the face at a
    random rotation (±30°), scale and offset, occupying roughly 55–80 % of the crop."""
    sizes = rng.integers(min_size, max_size + 1, num)
    angle = np.deg2rad(rng.uniform(-30.0, 30.0, num))
    scale = sizes / 112.0 * rng.uniform(0.55, 0.8, num)
    centre = sizes[:, None] * (0.5 + rng.uniform(-0.06, 0.06, (num, 2)))
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    m = np.zeros((num, 3, 3))
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1], m[:, 2, 2] = cos, -sin, sin, cos, 1.0
    m[:, 0, 2] = centre[:, 0] - (cos * 56.0 - sin * 56.0)
    m[:, 1, 2] = centre[:, 1] - (sin * 56.0 + cos * 56.0)
    return sizes, m


def faceness_scores(cond: dict[str, np.ndarray]) -> np.ndarray:
    """Detector-like confidence: lower for occluded, blurred and turned faces."""
    penalty = (0.3 * cond["glasses"] + 0.25 * cond["mask"] + 0.2 * cond["patch"]
               + 0.2 * cond["blur"] + 0.2 * np.abs(cond["yaw"]))
    return np.clip(0.999 - penalty, 0.3, 0.999)


def plan_ijb(latent: np.ndarray, probe_templates: int, max_media: int, max_images: int,
             crop_sizes: tuple[int, int], seed: int, quality: int,
             batch_images: int = 32) -> IJBPlan:
    """Plan the release: per subject one gallery template and ``probe_templates`` probes, each
    of 1..``max_media`` media (sessions) of 1..``max_images`` loose crops."""
    rng = np.random.default_rng([seed, 8, 0])
    subject, is_gallery, image_template, image_media, media_rows = [], [], [], [], []
    media_id = 0
    for s in range(len(latent)):
        for t in range(1 + probe_templates):
            subject.append(s + 1)
            is_gallery.append(t == 0)
            for _ in range(rng.integers(1, max_media + 1)):
                media_id += 1
                for _ in range(rng.integers(1, max_images + 1)):
                    image_template.append(len(subject))
                    image_media.append(media_id)
                    media_rows.append(s)
    image_media_arr = np.asarray(image_media)
    media_subject = np.zeros(media_id, dtype=int)
    media_subject[image_media_arr - 1] = media_rows
    media_cond = faces.sample_conditions(rng, media_id, faces.WILD)
    cond = faces.jitter_conditions(rng, media_cond, image_media_arr - 1)
    n = len(image_media)
    sizes, to_pixels = loose_placement(rng, n, *crop_sizes)
    cond["patch_box"][:, :2] *= (sizes / crop_sizes[1])[:, None]  # patches inside each crop
    lat = latent[media_subject[image_media_arr - 1]]
    jobs = [RenderJob(lat[i:i + batch_images], subset(cond, slice(i, i + batch_images)),
                      to_pixels[i:i + batch_images], int(crop_sizes[1]), (seed, 9, i), quality,
                      sizes[i:i + batch_images]) for i in range(0, n, batch_images)]
    truth = np.linalg.inv(to_pixels)[:, :2]
    return IJBPlan(np.asarray(subject), np.asarray(is_gallery), np.asarray(image_template),
                   image_media_arr, jobs, faces.landmarks_in_pixels(lat, cond, to_pixels), truth,
                   faces.face_boxes(lat, cond, to_pixels), faceness_scores(cond))


def write_ijb(root: Path, name: str, plan: IJBPlan, workers: int) -> dict[str, int]:
    """Write ``loose_crop/<i>.jpg`` and the meta files of an IJB-C-style release under ``root``.

    ``meta/<name>_face_tid_mid.txt`` (``img tid mid``), ``<name>_template_pair_label.txt``
    (``t1 t2 label``: every gallery×probe pair and every same-subject probe pair),
    ``<name>_name_5pts_score.txt`` (``img x1 y1 … x5 y5 faceness``), the 1:N files
    ``<name>_1N_gallery_G1.csv``/``_G2.csv`` (gallery templates of odd/even subjects, so
    family-mates fall in different galleries) and ``<name>_1N_probe_mixed.csv`` (all probe
    templates) with :data:`CSV_COLUMNS`, one row per image, FILENAME the loose-crop name, and
    ``<name>_align_truth.txt`` (``img m00 m01 m02 m10 m11 m12``): the exact loose-crop →
    aligned-112 similarity each crop was rendered with, for testing alignment.
    """
    lower = name.lower()
    crops, meta = root / "loose_crop", root / "meta"
    crops.mkdir(parents=True, exist_ok=True)
    meta.mkdir(parents=True, exist_ok=True)
    index = 0
    for encoded in run_jobs(plan.jobs, workers):
        for data in encoded:
            index += 1
            (crops / f"{index}.jpg").write_bytes(data)
    names = [f"{i + 1}.jpg" for i in range(index)]
    with open(meta / f"{lower}_face_tid_mid.txt", "w") as f:
        f.writelines(f"{img} {t} {m}\n" for img, t, m in
                     zip(names, plan.image_template, plan.image_media))
    with open(meta / f"{lower}_name_5pts_score.txt", "w") as f:
        for img, pts, score in zip(names, plan.landmarks, plan.faceness):
            f.write(f"{img} {' '.join(f'{v:.3f}' for v in pts.ravel())} {score:.3f}\n")
    with open(meta / f"{lower}_align_truth.txt", "w") as f:
        for img, m in zip(names, plan.truth):
            f.write(f"{img} {' '.join(f'{v:.6f}' for v in m.ravel())}\n")
    templates = np.arange(1, len(plan.subject) + 1)
    gallery, probes = templates[plan.is_gallery], templates[~plan.is_gallery]
    pairs = []
    for g in gallery:
        pairs.extend((g, p, int(plan.subject[g - 1] == plan.subject[p - 1])) for p in probes)
    for i, p in enumerate(probes):
        pairs.extend((p, q, 1) for q in probes[i + 1:]
                     if plan.subject[p - 1] == plan.subject[q - 1])
    with open(meta / f"{lower}_template_pair_label.txt", "w") as f:
        f.writelines(f"{a} {b} {label}\n" for a, b, label in pairs)
    g1 = gallery[plan.subject[gallery - 1] % 2 == 1]
    g2 = gallery[plan.subject[gallery - 1] % 2 == 0]
    for label, chosen in (("gallery_G1", g1), ("gallery_G2", g2), ("probe_mixed", probes)):
        with open(meta / f"{lower}_1N_{label}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            for i in np.flatnonzero(np.isin(plan.image_template, chosen)):
                t = plan.image_template[i]
                x, y, w, h = np.rint(plan.boxes[i]).astype(int)
                writer.writerow([t, plan.subject[t - 1], names[i], plan.image_media[i], x, y, w, h])
    return {"images": index, "templates": len(templates), "media": int(plan.image_media.max()),
            "subjects": int(plan.subject.max()), "pairs": len(pairs),
            "gallery_templates": len(gallery), "probe_templates": len(probes)}
