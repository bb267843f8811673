"""Helpers of the data tests: random JPEG bytes."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def jpeg_bytes(width=112, height=112, seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()
