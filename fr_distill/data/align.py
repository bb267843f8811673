"""Five-point face alignment onto the ArcFace template (METHOD V2).

A face is aligned by the least-squares similarity transform (rotation, uniform scale,
translation; Umeyama 1991, the estimator of scikit-image's ``SimilarityTransform`` and of
InsightFace's ``norm_crop``) that maps its five landmarks (left eye, right eye, nose tip,
left and right mouth corners, in image pixels) onto :data:`ARCFACE_TEMPLATE`, followed by a
bilinear warp of the image into a ``size × size`` crop. Pixel centres sit at integer
coordinates and pixels outside the source image read as black, as with OpenCV's
``warpAffine`` defaults, so crops match InsightFace's within interpolation rounding. Pure
numpy: no OpenCV dependency. :func:`align_folder` applies it to a folder of loose images
listed in a landmarks file of the IJB ``_name_5pts_score.txt`` format
(``img x1 y1 … x5 y5 [faceness]``), e.g. to prepare raw data such as VGGFace2.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .errors import DataError

ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963],
     [73.5318, 51.5014],
     [56.0252, 71.7366],
     [41.5493, 92.3655],
     [70.7299, 92.2041]], dtype=np.float32)
"""The five ArcFace landmark positions in a 112×112 crop (METHOD V2), ``[x, y]`` rows."""


def _as_points(points: np.ndarray, name: str) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] < 2:
        raise ValueError(f"{name}: expected an [N, 2] array of points with N >= 2, "
                         f"got shape {tuple(pts.shape)}")
    if not np.all(np.isfinite(pts)):
        raise ValueError(f"{name}: points contain NaN or infinity")
    return pts


def estimate_similarity(src_pts: np.ndarray, dst_pts: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform mapping ``src_pts`` onto ``dst_pts`` (Umeyama).

    Both are ``[N, 2]`` arrays of corresponding ``(x, y)`` points. Returns the 2×3 float64
    matrix ``M`` with ``dst ≈ M @ [x, y, 1]`` minimizing the summed squared error over
    rotations (no reflections), uniform scales and translations.
    """
    src = _as_points(src_pts, "src_pts")
    dst = _as_points(dst_pts, "dst_pts")
    if src.shape != dst.shape:
        raise ValueError(f"estimate_similarity: src_pts {src.shape} and dst_pts {dst.shape} "
                         "must have the same shape")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c ** 2).sum() / len(src)
    if src_var <= 1e-12:
        raise ValueError("estimate_similarity: src_pts are all the same point")
    cov = dst_c.T @ src_c / len(src)
    u, sing, vt = np.linalg.svd(cov)
    signs = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # best orthogonal map is a reflection
        signs[-1] = -1.0
    rotation = u @ np.diag(signs) @ vt
    scale = float(sing @ signs) / src_var
    matrix = np.empty((2, 3), dtype=np.float64)
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def template_for_size(size: int) -> np.ndarray:
    """The ArcFace template for a ``size × size`` crop, scaled as InsightFace's ``estimate_norm``.

    Multiples of 112 scale the template; other sizes scale it by ``size/128`` and shift x by
    ``8·size/128`` (InsightFace's 128-pixel convention).
    """
    if size <= 0:
        raise ValueError(f"template_for_size: size must be positive, got {size}")
    if size % 112 == 0:
        return ARCFACE_TEMPLATE.astype(np.float64) * (size / 112.0)
    ratio = size / 128.0
    template = ARCFACE_TEMPLATE.astype(np.float64) * ratio
    template[:, 0] += 8.0 * ratio
    return template


def warp_affine(image: np.ndarray, matrix: np.ndarray, out_height: int,
                out_width: int) -> np.ndarray:
    """Warp ``image`` (uint8 H×W×C or H×W) by the 2×3 forward ``matrix``, bilinear sampling.

    Output pixel ``(x, y)`` samples the source at ``M⁻¹ [x, y, 1]``; samples outside the source
    are black. Returns uint8 ``out_height × out_width (× C)``.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ValueError(f"warp_affine: expected a uint8 H×W or H×W×C image, got {img.dtype} "
                         f"with shape {tuple(img.shape)}")
    forward = np.vstack([np.asarray(matrix, dtype=np.float64).reshape(2, 3), [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(forward)
    ys, xs = np.mgrid[0:out_height, 0:out_width].astype(np.float64)
    src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    height, width = img.shape[:2]
    x0 = np.floor(src_x).astype(np.int64)
    y0 = np.floor(src_y).astype(np.int64)
    fx = (src_x - x0)[..., None]
    fy = (src_y - y0)[..., None]
    pixels = img.reshape(height, width, -1).astype(np.float32)
    out = np.zeros((out_height, out_width, pixels.shape[2]), dtype=np.float32)
    for dy, dx, weight in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)),
                           (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        sample = pixels[np.clip(yi, 0, height - 1), np.clip(xi, 0, width - 1)]
        out += np.where(inside[..., None], sample, 0.0) * weight
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out if img.ndim == 3 else out[..., 0]


def alignment_matrix(landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The 2×3 similarity matrix taking five ``landmarks`` onto the template for ``size``."""
    points = _as_points(landmarks, "landmarks")
    if points.shape != (5, 2):
        raise ValueError(f"landmarks: expected 5×2 points, got shape {tuple(points.shape)}")
    return estimate_similarity(points, template_for_size(size))


def align_face(image_hwc_uint8: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Align a face: warp ``image_hwc_uint8`` so its 5 ``landmarks`` land on the template.

    ``landmarks`` is 5×2 ``(x, y)`` in source pixels (left eye, right eye, nose, left mouth,
    right mouth). Returns a ``size × size × 3`` uint8 crop (METHOD V2).
    """
    image = np.asarray(image_hwc_uint8)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"align_face: expected a uint8 H×W×3 image, got {image.dtype} with "
                         f"shape {tuple(image.shape)}")
    return warp_affine(image, alignment_matrix(landmarks, size), size, size)


def read_landmarks_file(path: str | os.PathLike) -> list[tuple[str, np.ndarray, float]]:
    """Parse ``img x1 y1 … x5 y5 [faceness]`` lines into ``(name, 5×2 points, faceness)``.

    A malformed line raises :class:`DataError` naming the file and line number.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise DataError(f"{path}: cannot read landmarks file ({err.strerror})") from None
    entries = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (11, 12):
            raise DataError(f"{path}:{number}: expected 'img x1 y1 ... x5 y5 [faceness]' "
                            f"(11 or 12 fields), got {len(fields)}")
        try:
            values = np.array([float(v) for v in fields[1:]])
        except ValueError:
            raise DataError(f"{path}:{number}: non-numeric landmark value in "
                            f"{line.strip()!r}") from None
        if not np.all(np.isfinite(values)):
            raise DataError(f"{path}:{number}: landmark values must be finite")
        faceness = float(values[10]) if len(values) == 11 else 1.0
        entries.append((fields[0], values[:10].reshape(5, 2), faceness))
    return entries


def align_folder(image_dir: str | os.PathLike, landmarks_file: str | os.PathLike,
                 out_dir: str | os.PathLike, size: int = 112, min_faceness: float = 0.0,
                 quality: int = 95, progress: bool = True) -> int:
    """Align every image listed in ``landmarks_file`` (paths relative to ``image_dir``) into
    ``out_dir`` under the same relative name, as ``size × size`` crops; returns the count.

    Entries whose faceness is below ``min_faceness`` are skipped. The listed images must all
    exist (checked before any work); an undecodable one raises :class:`DataError`.
    """
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    entries = [e for e in read_landmarks_file(landmarks_file) if e[2] >= min_faceness]
    for name, _, _ in entries:
        if not (image_dir / name).is_file():
            raise DataError(f"{landmarks_file}: image {name!r} not found in {image_dir}")
    for name, points, _ in tqdm(entries, desc="align", disable=not progress):
        source = image_dir / name
        try:
            with Image.open(source) as img:
                pixels = np.asarray(img.convert("RGB"))
        except (OSError, SyntaxError) as err:
            raise DataError(f"{source}: cannot decode image ({err})") from None
        try:
            aligned = align_face(pixels, points, size)
        except ValueError as err:
            raise DataError(f"{landmarks_file}: {name}: {err}") from None
        target = out_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(aligned).save(target, quality=quality)
    return len(entries)
