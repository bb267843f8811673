"""Parametric face-like identities and a vectorized numpy renderer for the synthetic data set.

An identity is a vector of latent values in [0, 1] decoded through :data:`IDENTITY_RANGES`
into face geometry and appearance (face ellipse and chin, skin tone, eye/brow/nose/mouth
geometry, iris, hair and beard, ears, moles and a low-frequency skin texture of four
oriented cosines). Identities come in *families*: members share a base vector up to small
noise and differ strongly in only a few re-drawn values, so family-mates are hard negatives.

Each image adds per-image *conditions* (:func:`sample_conditions`): in-plane rotation,
scale and shift, yaw (features shift sideways by depth, the face narrows, the far eye
shrinks), expression (mouth opening), background, light gradient, brightness/contrast,
blur, noise, and occlusions (sunglasses, a lower-face mask, a random patch).

Geometry is drawn in a *face frame* of 112×112 units. Before rendering, each image's five
landmarks are fitted onto the ArcFace template by a similarity (the "normalization"), so
the face frame of an image is exactly its aligned frame: an aligned crop of it has the
landmarks where the least-squares alignment puts them. Rendering is analytic: every output
pixel is mapped into the face frame by the image's inverse transform and every feature is
a soft (anti-aliased) ellipse evaluated there, for a whole batch at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fr_distill.data.align import ARCFACE_TEMPLATE, estimate_similarity

FACE_CENTRE_X = 56.0
YAW_SHIFT = 9.0  # face-frame units a feature of depth 1 moves at yaw = ±1

IDENTITY_RANGES: dict[str, tuple[float, float]] = {
    "face_rx": (33.0, 43.0), "face_ry_top": (42.0, 52.0), "face_ry_bottom": (44.0, 58.0),
    "face_cy": (58.0, 66.0), "skin_tone": (0.0, 1.0), "skin_warmth": (-1.0, 1.0),
    "tex_amp": (0.03, 0.09),
    **{f"tex_freq{k}": (0.06, 0.30) for k in range(4)},
    **{f"tex_angle{k}": (0.0, np.pi) for k in range(4)},
    **{f"tex_phase{k}": (0.0, 2 * np.pi) for k in range(4)},
    **{f"mole{k}_{a}": r for k in range(2)
       for a, r in (("u", (-25.0, 25.0)), ("v", (50.0, 95.0)), ("on", (0.0, 1.0)))},
    "eye_half_dist": (15.5, 20.0), "eye_y": (48.0, 55.0), "eye_rx": (5.0, 7.5),
    "eye_ry": (2.4, 4.0), "eye_tilt": (-0.18, 0.18), "iris_hue": (0.0, 1.0),
    "iris_r": (2.0, 3.0), "brow_gap": (6.0, 11.0), "brow_thick": (1.4, 3.6),
    "brow_len": (8.0, 14.0), "brow_angle": (-0.30, 0.25), "brow_dark": (0.5, 1.0),
    "nose_tip_y": (67.0, 76.0), "nose_width": (7.0, 12.0), "nose_len": (14.0, 22.0),
    "nose_shade": (0.05, 0.20), "mouth_y": (86.0, 95.0), "mouth_half_w": (11.0, 17.0),
    "lip_thick": (2.2, 5.0), "lip_red": (0.0, 1.0), "hair_hue": (0.0, 1.0),
    "hairline": (14.0, 34.0), "hair_curve": (0.0, 0.03), "hair_volume": (2.0, 12.0),
    "hair_length": (50.0, 110.0), "beard": (0.0, 1.0), "ear_size": (5.0, 9.0),
}
IDENTITY_KEYS = tuple(IDENTITY_RANGES)
_LOW = np.array([IDENTITY_RANGES[k][0] for k in IDENTITY_KEYS], dtype=np.float64)
_SPAN = np.array([IDENTITY_RANGES[k][1] - IDENTITY_RANGES[k][0] for k in IDENTITY_KEYS])

SKIN_LIGHT = np.array([236.0, 200.0, 172.0])
SKIN_DARK = np.array([92.0, 60.0, 42.0])
HAIR_PALETTE = np.array([[20, 18, 18], [60, 40, 28], [110, 75, 45], [150, 70, 35],
                         [210, 180, 110], [170, 170, 170]], dtype=np.float64)
IRIS_PALETTE = np.array([[40, 25, 15], [95, 60, 30], [120, 100, 50], [70, 110, 60],
                         [70, 110, 170], [110, 120, 130]], dtype=np.float64)


@dataclass(frozen=True)
class Difficulty:
    """Ranges of the per-image variation; the presets below set the data set's splits."""

    roll_deg: float = 8.0  # in-plane rotation, uniform ±
    scale_jitter: float = 0.06  # uniform ±, relative
    shift_px: float = 3.0  # uniform ±, in output pixels of the aligned frame
    yaw: float = 0.6  # uniform ± (1 = strongest supported turn)
    profile_yaw: tuple[float, float] = (0.0, 0.0)  # if hi > 0: |yaw| drawn in this range
    occlusion_prob: float = 0.15  # per occlusion kind
    blur_prob: float = 0.4
    noise_max: float = 8.0  # noise std (0..255 scale), uniform in [0, max]
    light_max: float = 0.35  # strength of the light gradient


TRAIN = Difficulty()
FRONTAL = Difficulty(roll_deg=4.0, yaw=0.25, occlusion_prob=0.03, blur_prob=0.2, noise_max=5.0,
                     light_max=0.2)
PROFILE = Difficulty(yaw=0.3, profile_yaw=(0.7, 1.0), occlusion_prob=0.25, blur_prob=0.5,
                     noise_max=10.0, light_max=0.45)
WILD = Difficulty(roll_deg=0.0, scale_jitter=0.0, shift_px=0.0, yaw=0.9, occlusion_prob=0.2,
                  blur_prob=0.5, noise_max=10.0, light_max=0.45)


def sample_identities(rng: np.random.Generator, num: int, family_size: int = 4,
                      family_noise: float = 0.09, redrawn: int = 5) -> np.ndarray:
    """Latent vectors ``[num, len(IDENTITY_KEYS)]`` in [0, 1], grouped into families.

    Identities ``f·family_size … (f+1)·family_size-1`` form family ``f``: each member is the
    family's base plus Gaussian noise of std ``family_noise``, with ``redrawn`` randomly chosen
    values drawn afresh, so family-mates look alike yet stay separable.
    """
    dims = len(IDENTITY_KEYS)
    num_families = -(-num // family_size)
    base = rng.random((num_families, dims))
    latent = np.repeat(base, family_size, axis=0)[:num]
    latent = latent + rng.normal(0.0, family_noise, size=latent.shape)
    order = np.argsort(rng.random((num, dims)), axis=1)[:, :redrawn]
    fresh = rng.random((num, redrawn))
    np.put_along_axis(latent, order, fresh, axis=1)
    return np.clip(latent, 0.0, 1.0)


def decode(latent: np.ndarray) -> dict[str, np.ndarray]:
    """Map latent rows ``[B, dims]`` to named physical parameters (float64 ``[B]`` each)."""
    values = _LOW + np.asarray(latent, dtype=np.float64) * _SPAN
    return {key: values[:, i] for i, key in enumerate(IDENTITY_KEYS)}


def sample_conditions(rng: np.random.Generator, num: int,
                      difficulty: Difficulty) -> dict[str, np.ndarray]:
    """Per-image variation for ``num`` images (float64 arrays, first axis ``num``)."""
    d = difficulty
    u = lambda lo, hi, *shape: rng.uniform(lo, hi, size=(num, *shape))  # noqa: E731
    yaw = u(-d.yaw, d.yaw)
    if d.profile_yaw[1] > 0:
        profile = rng.random(num) < 0.5
        side = np.where(rng.random(num) < 0.5, -1.0, 1.0)
        yaw = np.where(profile, side * u(*d.profile_yaw), yaw)
    return {
        "roll": np.deg2rad(u(-d.roll_deg, d.roll_deg)),
        "scale": 1.0 + u(-d.scale_jitter, d.scale_jitter),
        "shift": u(-d.shift_px, d.shift_px, 2),
        "yaw": yaw,
        "mouth_open": np.clip(u(-0.6, 1.0), 0.0, 1.0),
        "eye_open": np.clip(u(0.6, 1.3), 0.15, 1.0),
        "bg": u(20.0, 235.0, 3),
        "bg_grad": u(-40.0, 40.0),
        "light_angle": u(0.0, 2 * np.pi),
        "light": u(0.0, d.light_max),
        "gain": u(0.8, 1.15),
        "skin_shift": u(-12.0, 12.0),
        "blur": np.where(rng.random(num) < d.blur_prob, u(0.3, 1.0), 0.0),
        "noise": u(0.0, d.noise_max),
        "glasses": (rng.random(num) < d.occlusion_prob).astype(np.float64),
        "mask": (rng.random(num) < d.occlusion_prob * 0.7).astype(np.float64),
        "patch": (rng.random(num) < d.occlusion_prob).astype(np.float64),
        "patch_box": u(0.0, 1.0, 4),
        "occ_color": u(10.0, 245.0, 3),
    }


def jitter_conditions(rng: np.random.Generator, cond: dict[str, np.ndarray],
                      index: np.ndarray, amount: float = 0.15) -> dict[str, np.ndarray]:
    """Conditions of images taken in the same session: rows ``cond[index]`` with small jitter.

    Used for the frames of one IJB "media": shared pose, light and occluders, slight changes.
    """
    out = {k: v[index].copy() for k, v in cond.items()}
    n = len(index)
    out["yaw"] = np.clip(out["yaw"] + rng.normal(0, amount, n), -1.0, 1.0)
    out["roll"] = out["roll"] + rng.normal(0, amount * 0.2, n)
    out["mouth_open"] = np.clip(out["mouth_open"] + rng.normal(0, amount * 2, n), 0.0, 1.0)
    out["noise"] = out["noise"] * rng.uniform(0.7, 1.3, n)
    out["light"] = out["light"] * rng.uniform(0.8, 1.2, n)
    return out


def _feature_positions(p: dict[str, np.ndarray], c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Yaw-adjusted feature centres and sizes in the raw face frame (before normalization)."""
    yaw = c["yaw"]
    turn = np.abs(yaw)
    shift = lambda depth: FACE_CENTRE_X + YAW_SHIFT * depth * yaw  # noqa: E731
    half = p["eye_half_dist"] * (1.0 - 0.12 * turn)
    return {
        "face_cx": shift(0.25), "face_rx": p["face_rx"] * (1.0 - 0.12 * turn),
        "eye_l": shift(0.6) - half, "eye_r": shift(0.6) + half,
        "nose_x": shift(1.0), "mouth_x": shift(0.7),
        "mouth_half": p["mouth_half_w"] * (1.0 - 0.2 * turn),
        "mouth_y": p["mouth_y"] + 1.5 * c["mouth_open"],
        "hair_cx": shift(0.1),
    }


def raw_landmarks(p: dict[str, np.ndarray], c: dict[str, np.ndarray]) -> np.ndarray:
    """The five landmarks ``[B, 5, 2]`` in the raw face frame (ArcFace order)."""
    f = _feature_positions(p, c)
    mouth_y = f["mouth_y"]
    pts = [(f["eye_l"], p["eye_y"]), (f["eye_r"], p["eye_y"]), (f["nose_x"], p["nose_tip_y"]),
           (f["mouth_x"] - f["mouth_half"], mouth_y), (f["mouth_x"] + f["mouth_half"], mouth_y)]
    return np.stack([np.stack(xy, axis=-1) for xy in pts], axis=1)


def normalization(p: dict[str, np.ndarray], c: dict[str, np.ndarray]) -> np.ndarray:
    """Per-image 3×3 similarities ``[B, 3, 3]`` taking raw landmarks onto the ArcFace template."""
    raw = raw_landmarks(p, c)
    out = np.tile(np.eye(3), (len(raw), 1, 1))
    for i, pts in enumerate(raw):
        out[i, :2] = estimate_similarity(pts, ARCFACE_TEMPLATE)
    return out


def pose_matrix(c: dict[str, np.ndarray]) -> np.ndarray:
    """Per-image 3×3 similarities ``[B, 3, 3]``: aligned frame → 112×112 output pixels (roll and
    scale about the crop centre, then shift): the residual misalignment of aligned data."""
    scale = c["scale"]
    cos, sin = np.cos(c["roll"]) * scale, np.sin(c["roll"]) * scale
    m = np.zeros((len(scale), 3, 3))
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, -sin, sin, cos
    m[:, 0, 2] = 56.0 + c["shift"][:, 0] - (cos * 56.0 - sin * 56.0)
    m[:, 1, 2] = 56.0 + c["shift"][:, 1] - (sin * 56.0 + cos * 56.0)
    m[:, 2, 2] = 1.0
    return m


def _palette(table: np.ndarray, t: np.ndarray) -> np.ndarray:
    pos = np.clip(t, 0.0, 1.0) * (len(table) - 1)
    lo = np.minimum(np.floor(pos).astype(int), len(table) - 2)
    w = (pos - lo)[:, None]
    return table[lo] * (1 - w) + table[lo + 1] * w


def _col(x: np.ndarray | float) -> np.ndarray:
    """``[B]`` (or a scalar) → ``[B, 1, 1]`` float32 for broadcasting over the pixel grid."""
    return np.asarray(x, dtype=np.float32).reshape(-1, 1, 1)


Window = tuple[slice, slice]
FULL: Window = (slice(None), slice(None))


class _Canvas:
    """Batch image ``[B, 3, H, W]`` float32 with the face-frame coordinates of every pixel.

    Small features are evaluated only inside a pixel window: the union over the batch of
    their bounding boxes, which keeps the cost of the many small ellipses low.
    """

    def __init__(self, to_face: np.ndarray, height: int, width: int) -> None:
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        a = to_face.astype(np.float32)
        self.u = a[:, 0, 0, None, None] * xs + a[:, 0, 1, None, None] * ys + a[:, 0, 2, None, None]
        self.v = a[:, 1, 0, None, None] * xs + a[:, 1, 1, None, None] * ys + a[:, 1, 2, None, None]
        self.to_face = to_face
        self.to_pixels = np.linalg.inv(to_face)
        scale = np.sqrt(np.abs(np.linalg.det(to_face[:, :2, :2])))
        self.px = _col(scale)  # face-frame length of one output pixel, for anti-aliasing
        self.xs, self.ys = xs, ys
        self.height, self.width = height, width
        self.img = np.zeros((len(to_face), 3, height, width), dtype=np.float32)

    def window(self, cx, cy, radius) -> Window:
        """Pixel rows/columns covering a face-frame disc (per-image centre and radius)."""
        m = self.to_pixels
        cx, cy = np.broadcast_to(cx, len(m)), np.broadcast_to(cy, len(m))
        px = m[:, 0, 0] * cx + m[:, 0, 1] * cy + m[:, 0, 2]
        py = m[:, 1, 0] * cx + m[:, 1, 1] * cy + m[:, 1, 2]
        r = np.broadcast_to(radius, len(m)) / self.px.ravel() + 2.0
        y0 = int(max(np.floor((py - r).min()), 0))
        y1 = int(min(np.ceil((py + r).max()) + 1, self.height))
        x0 = int(max(np.floor((px - r).min()), 0))
        x1 = int(min(np.ceil((px + r).max()) + 1, self.width))
        return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))

    def texture(self, p: dict[str, np.ndarray]) -> np.ndarray:
        """Sum of the identity's four cosines ``cos(fu·u + fv·v + phase)`` over the canvas.

        ``u, v`` are affine in the pixel coordinates, so each cosine is separable:
        cos(a·x + b·y + c) = cos(a·x + c)·cos(b·y) − sin(a·x + c)·sin(b·y).
        """
        m = self.to_face
        total = np.zeros_like(self.u)
        x, y = self.xs[0][None, None, :], self.ys[:, 0][None, :, None]
        for k in range(4):
            ang, freq = p[f"tex_angle{k}"], p[f"tex_freq{k}"]
            fu, fv = freq * np.cos(ang), freq * np.sin(ang)
            a = _col(fu * m[:, 0, 0] + fv * m[:, 1, 0])
            b = _col(fu * m[:, 0, 1] + fv * m[:, 1, 1])
            c = _col(fu * m[:, 0, 2] + fv * m[:, 1, 2] + p[f"tex_phase{k}"])
            ax, by = a * x + c, b * y
            total += np.cos(ax) * np.cos(by) - np.sin(ax) * np.sin(by)
        return total

    def coords(self, win: Window) -> tuple[np.ndarray, np.ndarray]:
        return self.u[:, win[0], win[1]], self.v[:, win[0], win[1]]

    def ellipse(self, cx, cy, rx, ry, angle=None, win: Window | None = None):
        """Soft coverage of ellipses (per-image centre, radii, optional angle): (alpha, window)."""
        if win is None:
            win = self.window(cx, cy, np.maximum(rx, ry))
        u, v = self.coords(win)
        du, dv = u - _col(cx), v - _col(cy)
        if angle is not None:
            cos, sin = _col(np.cos(angle)), _col(np.sin(angle))
            du, dv = du * cos + dv * sin, dv * cos - du * sin
        rx, ry = _col(rx), _col(ry)
        q = (du / rx) ** 2 + (dv / ry) ** 2
        alpha = np.clip(0.5 + (1.0 - q) * (0.5 * np.minimum(rx, ry) / self.px), 0.0, 1.0)
        return alpha, win

    def step(self, t: np.ndarray) -> np.ndarray:
        """Soft ``t > 0`` with a one-pixel transition (``t`` in face-frame units)."""
        return np.clip(0.5 + t / self.px, 0.0, 1.0)

    def paint(self, cover, color, weight=None) -> None:
        """Blend per-image colours ``[B, 3]`` with a coverage, optionally weighted per image."""
        alpha, win = cover
        if weight is not None:
            if not np.any(weight):
                return
            alpha = alpha * _col(weight)
        sub = self.img[:, :, win[0], win[1]]
        color = np.asarray(color, dtype=np.float32).reshape(-1, 3, 1, 1)
        sub += alpha[:, None] * (color - sub)

    def shade(self, cover, factor) -> None:
        """Multiply by ``1 - alpha·factor`` (darken where the coverage covers)."""
        alpha, win = cover
        if not np.any(factor):
            return
        self.img[:, :, win[0], win[1]] *= (1.0 - alpha * _col(factor))[:, None]


def _crop(alpha: np.ndarray, win: Window) -> np.ndarray:
    return alpha[:, win[0], win[1]]


def render(latent: np.ndarray, cond: dict[str, np.ndarray], to_pixels: np.ndarray,
           height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Render ``B`` faces: identity latents ``[B, dims]``, conditions, aligned-frame → pixel
    similarities ``[B, 3, 3]`` (see :func:`pose_matrix`); returns uint8 ``[B, H, W, 3]``."""
    p, c = decode(latent), cond
    f = _feature_positions(p, c)
    cv = _Canvas(np.linalg.inv(to_pixels @ normalization(p, c)), height, width)
    skin = _palette(np.stack([SKIN_LIGHT, SKIN_DARK]), p["skin_tone"])
    skin = skin + np.outer(p["skin_warmth"], [10.0, 0.0, -10.0]) + c["skin_shift"][:, None]
    hair = _palette(HAIR_PALETTE, p["hair_hue"])
    cv.img[:] = np.asarray(c["bg"], dtype=np.float32)[:, :, None, None]
    cv.img += (_col(c["bg_grad"]) * (cv.ys / height - 0.5))[:, None]
    face = _paint_head(cv, p, c, f, skin, hair)
    _paint_features(cv, p, c, f, skin, hair)
    _paint_occlusions(cv, p, c, f, face)
    return _finish(cv, c, rng)


def _paint_head(cv: _Canvas, p: dict, c: dict, f: dict, skin: np.ndarray,
                hair: np.ndarray) -> np.ndarray:
    """Hair volume, ears, the textured face, moles, hairline and beard; returns face coverage."""
    yaw = c["yaw"]
    # hair volume behind the head, cut at the hair length
    vol = p["hair_volume"]
    back, win = cv.ellipse(f["hair_cx"], p["face_cy"] - 6.0, f["face_rx"] + vol,
                           p["face_ry_top"] + vol, win=FULL)
    cv.paint((back * cv.step(_col(p["hair_length"]) - cv.v), win), hair)
    # ears, the far one hidden by yaw
    for side in (-1.0, 1.0):
        ear = cv.ellipse(f["face_cx"] + side * f["face_rx"], p["eye_y"] + 12.0,
                         p["ear_size"] * 0.6, p["ear_size"] * 1.2)
        cv.paint(ear, skin * 0.88, weight=np.clip(1.0 - 1.5 * side * yaw, 0.0, 1.0))
    # face: ellipse with separate upper and lower half-heights, texture and side shading
    du = cv.u - _col(f["face_cx"])
    dv = cv.v - _col(p["face_cy"])
    ry = np.where(dv < 0, _col(p["face_ry_top"]), _col(p["face_ry_bottom"]))
    rx = _col(f["face_rx"])
    q = (du / rx) ** 2 + (dv / ry) ** 2
    face = np.clip(0.5 + (1.0 - q) * (0.5 * rx / cv.px), 0.0, 1.0)
    tone = (1.0 + cv.texture(p) * _col(p["tex_amp"] / 2)) * (1.0 - 0.25 * (du / rx) ** 2)
    skin_px = np.asarray(skin, dtype=np.float32)[:, :, None, None] * tone[:, None]
    cv.img += face[:, None] * (skin_px - cv.img)
    for k in range(2):
        alpha, win = cv.ellipse(f["face_cx"] + p[f"mole{k}_u"], p[f"mole{k}_v"], 1.6, 1.6)
        cv.shade((alpha * _crop(face, win), win), 0.45 * (p[f"mole{k}_on"] > 0.55))
    # hairline fringe and beard
    win = cv.window(f["face_cx"], p["face_cy"] - p["face_ry_top"] / 2,
                    np.hypot(f["face_rx"], p["face_ry_top"] / 2))
    u, v = cv.coords(win)
    hairline = _col(p["hairline"]) + _col(p["hair_curve"]) * (u - _col(f["hair_cx"])) ** 2
    cv.paint((_crop(face, win) * cv.step(hairline - v), win), hair)
    beard = np.clip((p["beard"] - 0.65) / 0.35, 0.0, 1.0) * 0.75
    if np.any(beard):
        win = cv.window(f["face_cx"], p["face_cy"] + p["face_ry_bottom"] / 2,
                        np.hypot(f["face_rx"], p["face_ry_bottom"] / 2))
        chin = _crop(face, win) * cv.step(cv.coords(win)[1] - _col(p["nose_tip_y"] + 5.0))
        cv.paint((chin, win), hair, weight=beard)
    return face


def _paint_features(cv: _Canvas, p: dict, c: dict, f: dict, skin: np.ndarray,
                    hair: np.ndarray) -> None:
    """Brows, eyes, nose and mouth."""
    n, yaw = len(skin), c["yaw"]
    # brows
    for side, x in ((-1.0, f["eye_l"]), (1.0, f["eye_r"])):
        brow = cv.ellipse(x + side * 1.0, p["eye_y"] - p["brow_gap"], p["brow_len"] / 2,
                          p["brow_thick"] / 2, angle=-side * p["brow_angle"])
        cv.paint(brow, hair * p["brow_dark"][:, None])
    # eyes: sclera, iris, pupil (the far eye narrows with yaw)
    iris_color = _palette(IRIS_PALETTE, p["iris_hue"])
    for side, x in ((-1.0, f["eye_l"]), (1.0, f["eye_r"])):
        rx_eye = p["eye_rx"] * (1.0 - 0.3 * np.clip(side * yaw, 0.0, 1.0))
        sclera, win = cv.ellipse(x, p["eye_y"], rx_eye, p["eye_ry"] * c["eye_open"],
                                 angle=side * p["eye_tilt"])
        cv.paint((sclera, win), np.full((n, 3), 235.0))
        gaze = x + 1.5 * yaw
        iris = cv.ellipse(gaze, p["eye_y"], p["iris_r"], p["iris_r"], win=win)[0]
        cv.paint((sclera * iris, win), iris_color)
        pupil = cv.ellipse(gaze, p["eye_y"], p["iris_r"] * 0.45, p["iris_r"] * 0.45, win=win)[0]
        cv.paint((sclera * pupil, win), np.full((n, 3), 12.0))
    # nose: bridge shading, tip, nostrils
    cv.shade(cv.ellipse(f["nose_x"] - 0.8 * yaw, p["nose_tip_y"] - p["nose_len"] / 2,
                        p["nose_width"] * 0.3, p["nose_len"] / 2), p["nose_shade"])
    cv.shade(cv.ellipse(f["nose_x"], p["nose_tip_y"], p["nose_width"] / 2, 3.5),
             p["nose_shade"] * 0.8)
    for side in (-1.0, 1.0):
        nostril = cv.ellipse(f["nose_x"] + side * p["nose_width"] * 0.3, p["nose_tip_y"] + 1.5,
                             1.6, 1.0)
        cv.shade(nostril, 0.55 * np.clip(1.0 - side * yaw, 0.0, 1.0))
    # mouth: lips and the opening
    lip = skin * 0.75 + p["lip_red"][:, None] * np.array([40.0, -25.0, -15.0])
    mouth_y = f["mouth_y"]
    lips = cv.ellipse(f["mouth_x"], mouth_y, f["mouth_half"], p["lip_thick"] / 2
                      + 3.0 * c["mouth_open"])
    cv.paint(lips, lip)
    opening = cv.ellipse(f["mouth_x"], mouth_y, f["mouth_half"] * 0.8,
                         np.maximum(3.0 * c["mouth_open"], 1e-3), win=lips[1])
    cv.paint(opening, np.tile([[70.0, 25.0, 25.0]], (n, 1)), weight=c["mouth_open"] > 0.05)


def _paint_occlusions(cv: _Canvas, p: dict, c: dict, f: dict, face: np.ndarray) -> None:
    """Sunglasses and a lower-face mask (in the face frame), a patch in pixel space."""
    if np.any(c["glasses"]):
        for x in (f["eye_l"], f["eye_r"]):
            lens = cv.ellipse(x, p["eye_y"], p["eye_rx"] + 3.0, p["eye_ry"] + 4.0)
            cv.paint(lens, c["occ_color"] * 0.3, weight=c["glasses"])
    if np.any(c["mask"]):
        alpha, win = cv.ellipse(f["mouth_x"], f["mouth_y"] - 2.0, f["face_rx"] * 0.85, 16.0)
        cv.paint((alpha * _crop(face, win), win), c["occ_color"], weight=c["mask"])
    box, height, width = c["patch_box"], cv.height, cv.width
    for i in np.flatnonzero(c["patch"]):
        x0, y0 = int(box[i, 0] * width * 0.8), int(box[i, 1] * height * 0.8)
        x1 = x0 + int(width * (0.15 + 0.2 * box[i, 2]))
        y1 = y0 + int(height * (0.15 + 0.2 * box[i, 3]))
        cv.img[i, :, y0:y1, x0:x1] = np.asarray(c["occ_color"][i, ::-1], np.float32)[:, None, None]


def _finish(cv: _Canvas, c: dict, rng: np.random.Generator) -> np.ndarray:
    """Light gradient and gain, blur, noise; uint8 ``[B, H, W, 3]``."""
    n, height, width = len(cv.img), cv.height, cv.width
    lx, ly = np.cos(c["light_angle"]), np.sin(c["light_angle"])
    light = (_col(c["gain"]) + _col(c["light"] * lx) * (cv.xs / width - 0.5) * 2
             + _col(c["light"] * ly) * (cv.ys / height - 0.5) * 2)
    img = cv.img
    img *= light[:, None]
    blurred = np.flatnonzero(c["blur"] > 0)
    if len(blurred):
        img[blurred] += _col(c["blur"][blurred])[:, None] * (_blur(img[blurred]) - img[blurred])
    noise = rng.standard_normal((n, 1, height, width), dtype=np.float32)
    img += noise * _col(c["noise"])[:, None] + 0.5  # +0.5: the uint8 cast then rounds
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8).transpose(0, 2, 3, 1)


def _blur(img: np.ndarray) -> np.ndarray:
    """Separable binomial blur (kernel [1, 4, 6, 4, 1]/16) over H and W of ``[B, C, H, W]``."""
    h, w = img.shape[2:]
    pad = np.pad(img, ((0, 0), (0, 0), (2, 2), (0, 0)), mode="edge")
    rows = (pad[:, :, 0:h] + pad[:, :, 4:h + 4] + 4 * (pad[:, :, 1:h + 1] + pad[:, :, 3:h + 3])
            + 6 * pad[:, :, 2:h + 2]) / 16.0
    pad = np.pad(rows, ((0, 0), (0, 0), (0, 0), (2, 2)), mode="edge")
    return (pad[..., 0:w] + pad[..., 4:w + 4] + 4 * (pad[..., 1:w + 1] + pad[..., 3:w + 3])
            + 6 * pad[..., 2:w + 2]) / 16.0


def face_boxes(latent: np.ndarray, cond: dict[str, np.ndarray],
               to_pixels: np.ndarray) -> np.ndarray:
    """Bounding boxes ``[B, 4]`` (x, y, w, h) of the face ellipse in output pixels."""
    p = decode(latent)
    f = _feature_positions(p, cond)
    t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    cos, sin = np.cos(t)[None], np.sin(t)[None]
    xs = f["face_cx"][:, None] + f["face_rx"][:, None] * cos
    ys = p["face_cy"][:, None] + np.where(sin < 0, p["face_ry_top"][:, None],
                                          p["face_ry_bottom"][:, None]) * sin
    m = to_pixels @ normalization(p, cond)
    px = m[:, 0, 0, None] * xs + m[:, 0, 1, None] * ys + m[:, 0, 2, None]
    py = m[:, 1, 0, None] * xs + m[:, 1, 1, None] * ys + m[:, 1, 2, None]
    x0, y0 = px.min(axis=1), py.min(axis=1)
    return np.stack([x0, y0, px.max(axis=1) - x0, py.max(axis=1) - y0], axis=1)


def landmarks_in_pixels(latent: np.ndarray, cond: dict[str, np.ndarray],
                        to_pixels: np.ndarray) -> np.ndarray:
    """The five landmarks ``[B, 5, 2]`` of the rendered faces, in output pixels.

    In the aligned frame they sit at their least-squares fit onto the ArcFace template
    (the normalization), so aligning an image by them inverts ``to_pixels`` exactly.
    """
    p = decode(latent)
    raw = raw_landmarks(p, cond)
    m = to_pixels @ normalization(p, cond)
    return np.einsum("bij,bkj->bki", m[:, :2, :2], raw) + m[:, None, :2, 2]
