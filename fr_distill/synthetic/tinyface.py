"""The synthetic TinyFace-style release (METHOD V4): low-resolution faces in TinyFace's layout.

``tinyface/Testing_Set/`` with ``Gallery_Match/<id>_<n>.jpg`` (``gallery`` images of each of
the labelled identities, ``n`` = 1…), ``Probe/<id>_<n>.jpg`` (``probes`` more of each, ``n``
continuing), ``Gallery_Distractor/<k>.jpg`` (one image of each of ``distractors`` further
identities, names without an identity) and the MATLAB lists ``gallery_match_img_ID_pairs.mat``
(``gallery_set``, ``gallery_ids``) and ``probe_img_ID_pairs.mat`` (``probe_set``,
``probe_ids``) as in the real release. Each face is rendered aligned at 112×112 with the
residual misalignment, pose, occlusion and blur of :data:`LOW_RESOLUTION`, then shrunk to
``h`` pixels high (uniform in ``sizes``) and ``0.75…1``·``h`` wide: TinyFace's faces are about
20×16 pixels.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io

from . import faces
from .release import RenderJob, run_jobs, subset

LOW_RESOLUTION = faces.Difficulty(yaw=0.6, occlusion_prob=0.1, blur_prob=0.3, noise_max=6.0)
MAT_DESCRIPTION = b"MATLAB 5.0 MAT-file, fr_distill synthetic TinyFace-style release"
"""The 116-byte text header of the MATLAB files; scipy would write the current time there."""


@dataclass
class TinyFacePlan:
    """What to render: per image its folder and file name (gallery, probes, distractors)."""

    folders: list[str]
    names: list[str]
    identities: np.ndarray  # per image; 0 for distractors
    jobs: list[RenderJob]


def plan_tinyface(latent: np.ndarray, identities: int, gallery: int, probes: int,
                  sizes: tuple[int, int], seed: int, quality: int,
                  batch_images: int = 64) -> TinyFacePlan:
    """Plan the release: the first ``identities`` rows of ``latent`` are the labelled
    identities (1-based ids), every further row one distractor."""
    folders, names, rows, ids = [], [], [], []
    for folder, first, count in (("Gallery_Match", 1, gallery), ("Probe", gallery + 1, probes)):
        for identity in range(1, identities + 1):
            for n in range(first, first + count):
                folders.append(folder)
                names.append(f"{identity}_{n}.jpg")
                rows.append(identity - 1)
                ids.append(identity)
    for k, row in enumerate(range(identities, len(latent)), start=1):
        folders.append("Gallery_Distractor")
        names.append(f"{k:06d}.jpg")
        rows.append(row)
        ids.append(0)
    rng = np.random.default_rng([seed, 11, 0])
    cond = faces.sample_conditions(rng, len(rows), LOW_RESOLUTION)
    heights = rng.integers(sizes[0], sizes[1] + 1, len(rows))
    widths = np.rint(heights * rng.uniform(0.75, 1.0, len(rows))).astype(int)
    shrink = np.stack([widths, heights], axis=1)
    lat, to_pixels = latent[np.asarray(rows)], faces.pose_matrix(cond)
    jobs = [RenderJob(lat[i:i + batch_images], subset(cond, slice(i, i + batch_images)),
                      to_pixels[i:i + batch_images], 112, (seed, 12, i), quality,
                      shrink=shrink[i:i + batch_images])
            for i in range(0, len(rows), batch_images)]
    return TinyFacePlan(folders, names, np.asarray(ids), jobs)


def write_tinyface(root: Path, plan: TinyFacePlan, workers: int) -> dict[str, int]:
    """Write ``root/Testing_Set/`` (folders and MATLAB lists, see the module doc); the counts."""
    testing_set = root / "Testing_Set"
    encoded = (data for batch in run_jobs(plan.jobs, workers) for data in batch)
    for folder, name, data in zip(plan.folders, plan.names, encoded):
        (testing_set / folder).mkdir(parents=True, exist_ok=True)
        (testing_set / folder / name).write_bytes(data)
    counts = {}
    for folder, file_name, prefix in (("Gallery_Match", "gallery_match_img_ID_pairs.mat", "gallery"),
                                      ("Probe", "probe_img_ID_pairs.mat", "probe")):
        chosen = [i for i, f in enumerate(plan.folders) if f == folder]
        names = np.empty((len(chosen), 1), dtype=object)
        names[:, 0] = [plan.names[i] for i in chosen]
        ids = plan.identities[chosen].astype(np.float64).reshape(-1, 1)
        buffer = io.BytesIO()
        scipy.io.savemat(buffer, {f"{prefix}_set": names, f"{prefix}_ids": ids})
        (testing_set / file_name).write_bytes(MAT_DESCRIPTION.ljust(116, b"\0")
                                              + buffer.getvalue()[116:])
        counts[folder.lower()] = len(chosen)
    counts["gallery_distractor"] = plan.folders.count("Gallery_Distractor")
    counts["identities"] = int(plan.identities.max())
    return counts
