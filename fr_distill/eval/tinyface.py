"""TinyFace low-resolution identification (METHOD V4): the release, its images, CMC ranks.

The release (Cheng et al., ACCV 2018) as distributed: ``tinyface/Testing_Set/`` holds
``Probe/``, ``Gallery_Match/`` and ``Gallery_Distractor/`` image folders and the MATLAB
files ``probe_img_ID_pairs.mat`` / ``gallery_match_img_ID_pairs.mat``. As in AdaFace's
``validation_lq/tinyface_helper.py`` (the implementation the field reports), the folders are
walked for ``.jpg``/``.jpeg``/``.png`` files, the identity of a probe or matched gallery image
is the integer before the first ``_`` of its file name (``1_3.jpg`` → 1), and distractors
have no identity. Every probe is searched in the gallery (the matched images and the
distractors); rank-k is the share of probes whose best-scoring same-identity gallery image
is among the k best gallery scores (closed-set CMC). Scores are cosine similarities of the
flip-fused features (``normalize(e(x) + e(flip(x)))``, as V1–V3).

Images are used whole, resized to 112×112 by PIL's bilinear filter (:class:`ResizedImages`);
the release has no landmarks. Ties: a non-matching gallery image scoring *equal* to the
probe's best match ranks before it (:func:`mate_ranks`), so a model whose features do not
vary cannot score well.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fr_distill.paths import check_regular

from .errors import EvalDataError
from .imageio import read_image

FOLDERS = ("Probe", "Gallery_Match", "Gallery_Distractor")
EXTENSIONS = (".jpg", ".jpeg", ".png")
RANKS = (1, 5, 20)
DISTRACTOR = -1
"""Identity of a distractor: never a probe's (file-name identities are non-negative)."""
PAIR_FILES = {"Probe": ("probe_img_ID_pairs.mat", "probe_set", "probe_ids"),
              "Gallery_Match": ("gallery_match_img_ID_pairs.mat", "gallery_set", "gallery_ids")}
"""The release's MATLAB lists of (image name, identity), checked against the folders when present."""
_LABEL = re.compile(r"(\d+)_")


@dataclass
class TinyFaceRelease:
    """The images of one TinyFace test set: probes, then matched gallery, then distractors."""

    testing_set: Path
    image_paths: list[str]
    labels: np.ndarray  # int64 per image; DISTRACTOR for distractors
    num_probes: int
    num_matches: int

    @property
    def num_distractors(self) -> int:
        return len(self.image_paths) - self.num_probes - self.num_matches


def label_of(path: str | Path) -> int:
    """The identity in a probe/matched-gallery file name: the digits before the first ``_``."""
    match = _LABEL.match(Path(path).name)
    if match is None:
        raise EvalDataError(f"{path}: cannot read an identity from the file name (expected "
                            f"'<identity>_<n>.jpg', e.g. 1_3.jpg)")
    return int(match.group(1))


def find_testing_set(root: str | Path) -> Path:
    """The folder holding ``Probe/``: ``root`` itself, ``root/Testing_Set`` or
    ``root/tinyface/Testing_Set``; the other two folders must be beside it."""
    root = Path(root)
    candidates = (root, root / "Testing_Set", root / "tinyface" / "Testing_Set")
    found = next((c for c in candidates if (c / "Probe").is_dir()), None)
    if found is None:
        if not root.is_dir():
            raise EvalDataError(f"{root}: TinyFace release not found (no such directory)")
        raise EvalDataError(f"{root}: not a TinyFace release: no Probe/ folder in it, in "
                            f"Testing_Set/ or in tinyface/Testing_Set/")
    for name in FOLDERS[1:]:
        if not (found / name).is_dir():
            raise EvalDataError(f"{found / name}: folder not found (a TinyFace test set has "
                                f"{', '.join(f + '/' for f in FOLDERS)})")
    return found


def list_images(folder: Path) -> list[Path]:
    """The images under ``folder`` (recursively), sorted; at least one. An image name that is
    no regular file (a dangling link, a FIFO, a device) is refused by name: leaving it out
    would change the set the ranks are computed on without a word."""
    images = sorted(p for p in folder.rglob("*") if p.suffix in EXTENSIONS and not p.is_dir())
    for path in images:
        if path.is_symlink() and not path.exists():
            raise EvalDataError(f"{path}: a dangling link (its target {os.readlink(path)} does "
                                f"not exist)")
        try:
            check_regular(path)
        except OSError as err:
            raise EvalDataError(f"{path}: cannot read image ({err.strerror or err})") from None
    if not images:
        raise EvalDataError(f"{folder}: no {'/'.join(EXTENSIONS)} images in it")
    return images


def _check_pair_file(testing_set: Path, folder: str, paths: list[Path], labels: list[int]) -> None:
    """When the release's MATLAB list for ``folder`` is present, its names and identities must
    be those of the folder's files."""
    file_name, names_key, ids_key = PAIR_FILES[folder]
    mat_path = testing_set / file_name
    if not mat_path.is_file():
        return
    import scipy.io  # on first use: a training process need not import scipy

    try:
        mat = scipy.io.loadmat(str(mat_path))
        names = [str(np.asarray(entry).ravel()[0]) for entry in np.asarray(mat[names_key]).ravel()]
        ids = np.asarray(mat[ids_key], dtype=np.float64).ravel()
    except KeyError as err:
        raise EvalDataError(f"{mat_path}: no variable {err} in it") from None
    except Exception as err:  # scipy's readers raise many kinds for a damaged file
        raise EvalDataError(f"{mat_path}: cannot read it as a MATLAB file ({err})") from None
    if len(names) != len(ids):
        raise EvalDataError(f"{mat_path}: {len(names)} names in {names_key} but {len(ids)} "
                            f"identities in {ids_key}")
    on_disk = {p.name: label for p, label in zip(paths, labels)}
    for name, identity in zip(names, ids):
        if name not in on_disk:
            raise EvalDataError(f"{mat_path}: {name} is not in {testing_set / folder}")
        if identity != on_disk[name]:
            raise EvalDataError(f"{mat_path}: {name} has identity {identity:g}, its file name "
                                f"says {on_disk[name]}")
    if len(set(names)) != len(on_disk):
        extra = sorted(set(on_disk) - set(names))[0]
        raise EvalDataError(f"{testing_set / folder / extra}: not listed in {mat_path}")


def load_tinyface(root: str | Path) -> TinyFaceRelease:
    """Read a TinyFace test set (see the module doc); one-line errors name the folder or file."""
    testing_set = find_testing_set(root)
    probes, matches, distractors = (list_images(testing_set / name) for name in FOLDERS)
    probe_labels = [label_of(p) for p in probes]
    match_labels = [label_of(p) for p in matches]
    _check_pair_file(testing_set, "Probe", probes, probe_labels)
    _check_pair_file(testing_set, "Gallery_Match", matches, match_labels)
    enrolled = set(match_labels)
    for path, label in zip(probes, probe_labels):
        if label not in enrolled:
            raise EvalDataError(f"{path}: identity {label} has no image in "
                                f"{testing_set / 'Gallery_Match'}")
    labels = np.array(probe_labels + match_labels + [DISTRACTOR] * len(distractors), np.int64)
    return TinyFaceRelease(testing_set, [str(p) for p in probes + matches + distractors], labels,
                           len(probes), len(matches))


class ResizedImages:
    """Whole images resized to ``size × size`` by PIL's bilinear filter (TinyFace faces are
    about 20×16 pixels; the network sees them upsampled)."""

    def __init__(self, paths: list[str], size: int = 112):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, 3, self.size, self.size), dtype=np.uint8)
        for offset, index in enumerate(range(start, stop)):
            image = Image.fromarray(read_image(self.paths[index]))
            resized = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
            out[offset] = np.asarray(resized).transpose(2, 0, 1)
        return out


def mate_ranks(scores: torch.Tensor, is_mate: torch.Tensor) -> torch.Tensor:
    """Rank (1-based) of each probe's best-scoring mate in its row of ``scores`` ``[P, G]``:
    one plus the number of non-mates scoring at least as high (ties rank the non-mate
    first). A probe without a mate gets rank ``G + 1``."""
    best = torch.where(is_mate, scores, torch.full_like(scores, -torch.inf)).amax(dim=1)
    ahead = (scores >= best[:, None]) & ~is_mate
    ranks = ahead.sum(dim=1) + 1
    return torch.where(torch.isfinite(best), ranks, torch.full_like(ranks, scores.shape[1] + 1))


def cmc(probe_feats: torch.Tensor, probe_labels, gallery_feats: torch.Tensor, gallery_labels,
        ranks=RANKS, chunk_size: int = 256) -> dict[str, float]:
    """Closed-set CMC of L2-normalized features: ``{"rank1": …, "rank5": …, "rank20": …}``,
    each the share of probes whose best mate is within that rank. Scores are float64 dot
    products, computed ``chunk_size`` probes at a time on the features' device (on the real
    release's 157,871 gallery images, about 0.3 GB per score block)."""
    gallery = gallery_feats.to(torch.float64)
    probes = probe_feats.to(device=gallery.device, dtype=torch.float64)
    g_labels = torch.as_tensor(np.asarray(gallery_labels), device=gallery.device)
    p_labels = torch.as_tensor(np.asarray(probe_labels), device=gallery.device)
    found = torch.cat([mate_ranks(probes[s:s + chunk_size] @ gallery.T,
                                  p_labels[s:s + chunk_size, None] == g_labels[None, :])
                       for s in range(0, len(probes), chunk_size)])
    return {f"rank{k}": float((found <= k).sum()) / len(found) for k in ranks}


def score_tinyface(release: TinyFaceRelease, feats: torch.Tensor, device: torch.device) -> dict:
    """V4 results of the flip-fused image features ``feats`` (release order): CMC ranks and
    the counts of probes, matched gallery images and distractors."""
    normalized = torch.nn.functional.normalize(feats.to(device), dim=1)
    p = release.num_probes
    result = cmc(normalized[:p], release.labels[:p], normalized[p:], release.labels[p:])
    result.update(probes=p, gallery_match=release.num_matches,
                  distractors=release.num_distractors)
    return result
