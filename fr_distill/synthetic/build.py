"""``generate``: plan and write the whole synthetic data set, or reuse it when already there."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from fr_distill.data.errors import DataError
from fr_distill.paths import atomic_write

from . import faces, release, tinyface

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # bump whenever the rendered bytes change, so old outputs are not reused
POOLS = {"train": 1, "verification": 4, "ijb": 7, "tinyface": 10}
"""Random streams of the four identity pools; separate pools make the splits disjoint."""


def identity_pool(seed: int, pool: str, num: int, family_size: int) -> np.ndarray:
    """Latent vectors ``[num, dims]`` of one identity pool (a key of :data:`POOLS`)."""
    rng = np.random.default_rng([seed, POOLS[pool], 0])
    return faces.sample_identities(rng, num, family_size)


def _check(parameters: dict) -> None:
    p = parameters
    rules = [
        ("num_identities", p["num_identities"] >= 2, "at least 2"),
        ("images_per_identity", p["images_per_identity"] >= 1, "at least 1"),
        ("family_size", p["family_size"] >= 1, "at least 1"),
        ("bin_identities", p["bin_identities"] >= 2, "at least 2"),
        ("bin_pairs", p["bin_pairs"] >= 2, "at least 2"),
        ("ijb_subjects", p["ijb_subjects"] >= 2, "at least 2"),
        ("ijb_probe_templates", p["ijb_probe_templates"] >= 1, "at least 1"),
        ("ijb_max_media", p["ijb_max_media"] >= 1, "at least 1"),
        ("ijb_max_images", p["ijb_max_images"] >= 1, "at least 1"),
        ("ijb_crop_sizes", 112 < p["ijb_crop_sizes"][0] <= p["ijb_crop_sizes"][1] <= 1024,
         "min <= max, both in 113..1024 (loose crops are larger than 112)"),
        ("ijb_name", p["ijb_name"].isalnum(), "letters and digits only"),
        ("tinyface_identities", p["tinyface_identities"] >= 2, "at least 2"),
        ("tinyface_gallery", p["tinyface_gallery"] >= 1, "at least 1"),
        ("tinyface_probes", p["tinyface_probes"] >= 1, "at least 1"),
        ("tinyface_distractors", p["tinyface_distractors"] >= 0, "at least 0"),
        ("tinyface_sizes", 4 <= p["tinyface_sizes"][0] <= p["tinyface_sizes"][1] <= 112,
         "min <= max, both in 4..112 (low-resolution faces)"),
        ("quality", 1 <= p["quality"] <= 100, "in 1..100"),
    ]
    for key, ok, need in rules:
        if not ok:
            raise DataError(f"synthetic data: {key}={p[key]!r} is invalid (must be {need})")


def _owned_paths(out_dir: Path, ijb_name: str) -> list[Path]:
    return [out_dir / "train", out_dir / "train.rec", out_dir / "train.idx",
            *(out_dir / f"{spec.name}.bin" for spec in release.BIN_SETS),
            out_dir / "ijb" / ijb_name, out_dir / "tinyface"]


def _file_sizes(out_dir: Path, paths: list[Path]) -> dict[str, int]:
    return {str(p.relative_to(out_dir)): p.stat().st_size for p in paths}


def _reusable(out_dir: Path, parameters: dict) -> dict | None:
    """The existing manifest when it is complete, for the same parameters, and its files are
    all present with their recorded sizes; else ``None``."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not manifest.get("complete") or manifest.get("parameters") != parameters:
        return None
    for rel, size in manifest.get("files", {}).items():
        path = out_dir / rel
        if not path.is_file() or path.stat().st_size != size:
            return None
    return manifest


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write(out_dir / MANIFEST, text.encode())


def _clear_previous(out_dir: Path, ijb_name: str) -> None:
    """Remove the outputs of an earlier generation; refuse to touch foreign data."""
    owned = [p for p in _owned_paths(out_dir, ijb_name) if p.exists()]
    if owned and not (out_dir / MANIFEST).is_file():
        raise DataError(f"{owned[0]}: exists but {out_dir / MANIFEST} does not; not written by "
                        "the synthetic generator — remove it or choose another directory")
    try:
        previous = json.loads((out_dir / MANIFEST).read_text())["parameters"]["ijb_name"]
    except (OSError, ValueError, KeyError, TypeError):
        previous = None
    if isinstance(previous, str) and previous.isalnum() and previous != ijb_name:
        owned += [p for p in [out_dir / "ijb" / previous] if p.exists()]
    for path in owned:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def generate(out_dir: str | os.PathLike, num_identities: int = 200, images_per_identity: int = 20,
             seed: int = 0, *, family_size: int = 4, bin_identities: int = 100,
             bin_pairs: int = 600, ijb_name: str = "IJBS", ijb_subjects: int = 40,
             ijb_probe_templates: int = 2, ijb_max_media: int = 3, ijb_max_images: int = 3,
             ijb_crop_sizes: tuple[int, int] = (150, 200), tinyface_identities: int = 20,
             tinyface_gallery: int = 2, tinyface_probes: int = 2, tinyface_distractors: int = 60,
             tinyface_sizes: tuple[int, int] = (16, 32), quality: int = 90,
             workers: int | None = None, force: bool = False) -> dict:
    """Write the synthetic face data set into ``out_dir`` and return its manifest.

    See the package docstring for the layout. The output is a pure function of the arguments
    other than ``workers`` (render processes; default: all CPU cores) and ``force``: when
    ``out_dir/manifest.json`` records a complete generation with the same arguments and its
    files are intact, nothing is rendered (``force=True`` regenerates anyway). Training,
    verification, IJB and TinyFace identities are four separate pools, so they are disjoint.
    """
    out_dir = Path(out_dir)
    parameters = {
        "format_version": FORMAT_VERSION, "seed": int(seed),
        "num_identities": int(num_identities), "images_per_identity": int(images_per_identity),
        "family_size": int(family_size), "bin_identities": int(bin_identities),
        "bin_pairs": int(bin_pairs), "ijb_name": str(ijb_name), "ijb_subjects": int(ijb_subjects),
        "ijb_probe_templates": int(ijb_probe_templates), "ijb_max_media": int(ijb_max_media),
        "ijb_max_images": int(ijb_max_images),
        "ijb_crop_sizes": [int(ijb_crop_sizes[0]), int(ijb_crop_sizes[1])],
        "tinyface_identities": int(tinyface_identities), "tinyface_gallery": int(tinyface_gallery),
        "tinyface_probes": int(tinyface_probes), "tinyface_distractors": int(tinyface_distractors),
        "tinyface_sizes": [int(tinyface_sizes[0]), int(tinyface_sizes[1])],
        "quality": int(quality),
    }
    _check(parameters)
    if not force and (manifest := _reusable(out_dir, parameters)) is not None:
        return manifest
    workers = int(workers) if workers else (os.cpu_count() or 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(out_dir, ijb_name)
    manifest = {"generator": "fr_distill.synthetic", "parameters": parameters,
                "complete": False}
    _write_manifest(out_dir, manifest)

    train_latent = identity_pool(seed, "train", num_identities, family_size)
    jobs = release.train_jobs(train_latent, images_per_identity, seed, quality)
    num_train = release.write_train(out_dir, jobs, num_identities, images_per_identity, workers)

    bin_latent = identity_pool(seed, "verification", bin_identities, family_size)
    bins = {}
    for i, spec in enumerate(release.BIN_SETS):
        jobs, issame = release.bin_jobs(i, spec, bin_latent, bin_pairs, family_size, seed, quality)
        bins[spec.name] = release.write_bin(out_dir / f"{spec.name}.bin", jobs, issame, workers)

    ijb_root = out_dir / "ijb" / ijb_name
    plan = release.plan_ijb(identity_pool(seed, "ijb", ijb_subjects, family_size),
                            ijb_probe_templates, ijb_max_media, ijb_max_images,
                            tuple(ijb_crop_sizes), seed, quality)
    ijb_counts = release.write_ijb(ijb_root, ijb_name, plan, workers)

    tinyface_root = out_dir / "tinyface"
    tinyface_latent = identity_pool(seed, "tinyface", tinyface_identities + tinyface_distractors,
                                    family_size)
    tinyface_plan = tinyface.plan_tinyface(tinyface_latent, tinyface_identities, tinyface_gallery,
                                           tinyface_probes, tuple(tinyface_sizes), seed, quality)
    tinyface_counts = tinyface.write_tinyface(tinyface_root, tinyface_plan, workers)

    files = [out_dir / "train.rec", out_dir / "train.idx",
             *(out_dir / f"{name}.bin" for name in bins), *sorted((ijb_root / "meta").iterdir()),
             *sorted((tinyface_root / "Testing_Set").glob("*.mat"))]
    manifest.update({
        "complete": True,
        "counts": {"train_identities": num_identities, "train_images": num_train,
                   "bin_pairs": bins, "ijb": ijb_counts, "tinyface": tinyface_counts},
        "files": _file_sizes(out_dir, files),
    })
    _write_manifest(out_dir, manifest)
    return manifest


def write_verification_bin(path: str | os.PathLike, num_pairs: int, seed: int = 0, *,
                           bin_identities: int = 100, family_size: int = 4, quality: int = 90,
                           workers: int | None = None) -> Path:
    """Write only the frontal verification set of :func:`generate` (``synth_lfw``: its
    identities, pairs and rendering for these arguments) to ``path``, an InsightFace ``.bin``
    of ``num_pairs`` pairs; for checks that need a `.bin` but no training data."""
    if num_pairs < 2 or bin_identities < 2 or family_size < 1:
        raise DataError(f"synthetic verification set: num_pairs={num_pairs}, bin_identities="
                        f"{bin_identities}, family_size={family_size} (need at least 2, 2, 1)")
    latent = identity_pool(seed, "verification", bin_identities, family_size)
    jobs, issame = release.bin_jobs(0, release.BIN_SETS[0], latent, num_pairs, family_size, seed,
                                    quality)
    path = Path(path)
    release.write_bin(path, jobs, issame, int(workers) if workers else (os.cpu_count() or 1))
    return path
