"""Decoding one encoded training image to RGB uint8 (the PyTorch path's decoder)."""
from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image

from .dataset import IMAGE_SIZE, JPEG_MAGIC
from .errors import DataError


def decode_rgb(data: bytes, where: str) -> np.ndarray:
    """HWC uint8 RGB pixels of a JPEG (libjpeg-turbo via simplejpeg) or PNG (PIL) image."""
    try:
        if data.startswith(JPEG_MAGIC):
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB")
        else:
            with Image.open(io.BytesIO(data)) as img:
                pixels = np.asarray(img.convert("RGB"))
    except Exception as err:  # decoders raise assorted types for corrupt data
        raise DataError(f"{where}: cannot decode image ({str(err).splitlines()[0]})") from None
    if pixels.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{where}: image is {pixels.shape[1]}x{pixels.shape[0]}; training images "
                        f"must be aligned {IMAGE_SIZE}x{IMAGE_SIZE}")
    return pixels
