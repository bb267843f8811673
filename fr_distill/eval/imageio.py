"""Decoding of encoded face images for evaluation (JPEG via simplejpeg, other formats via PIL)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image

from .errors import EvalDataError


def decode_image(payload: bytes, file: str, what: str) -> np.ndarray:
    """RGB ``H×W×3`` uint8 of ``payload``; :class:`EvalDataError` naming ``file`` and ``what``."""
    try:
        if bytes(payload[:2]) == b"\xff\xd8":
            return simplejpeg.decode_jpeg(bytes(payload), colorspace="RGB")
        with Image.open(io.BytesIO(payload)) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as err:  # any decoder failure is a bad record
        raise EvalDataError(f"{file}: {what} cannot be decoded ({err})") from None


def read_image(path: str) -> np.ndarray:
    """RGB ``H×W×3`` uint8 of the image file ``path``; :class:`EvalDataError` naming it."""
    try:
        payload = Path(path).read_bytes()
    except OSError as err:
        raise EvalDataError(f"{path}: cannot read image ({err.strerror})") from None
    return decode_image(payload, path, "image")
