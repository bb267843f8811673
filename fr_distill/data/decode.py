"""Decoding one encoded image to RGB uint8: the one decoder of training (the PyTorch path and
the decode check) and of evaluation (:mod:`fr_distill.eval.imageio`).

The size an image's header declares is checked before its pixels are decoded: a JPEG of a
few hundred bytes can declare 30000×30000 pixels, 2.5 GB once decoded. Nothing the project
reads needs more than :data:`MAX_IMAGE_PIXELS` (4096×4096, 16.8 megapixels, 48 MiB of RGB):
training and verification images are aligned 112×112 faces, IJB and TinyFace images are crops
of a few hundred pixels. The header is read by the decoder that decodes the image (libjpeg-
turbo's for JPEG via simplejpeg, PIL's lazy ``Image.open`` for the others), so the size checked
is the size decoded.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import simplejpeg
from PIL import Image

from .dataset import IMAGE_SIZE, JPEG_MAGIC
from .errors import DataError

MAX_IMAGE_SIDE = 4096
MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE


class ImageTooLargeError(ValueError):
    """An image whose header declares more than :data:`MAX_IMAGE_PIXELS` pixels."""


def _check_declared_size(width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(
            f"its header declares {width}x{height} pixels, more than {MAX_IMAGE_SIDE}x"
            f"{MAX_IMAGE_SIDE}; refused before decoding")


def decode_pixels(data: bytes) -> np.ndarray:
    """HWC uint8 RGB pixels of a JPEG (libjpeg-turbo via simplejpeg) or another image PIL
    reads (PNG); :class:`ImageTooLargeError` when the header declares more than
    :data:`MAX_IMAGE_PIXELS` pixels, the decoders' own exceptions for corrupt data."""
    data = bytes(data)
    if data.startswith(JPEG_MAGIC):
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        _check_declared_size(width, height)
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    with warnings.catch_warnings():  # PIL warns of large images; they are refused below
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:  # lazy: the header only
            _check_declared_size(*img.size)
            return np.asarray(img.convert("RGB"))


def problem_text(err: BaseException) -> str:
    """The first line of a decoder's exception, at most 200 characters (for one-line errors)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def decode_rgb(data: bytes, where: str) -> np.ndarray:
    """HWC uint8 RGB pixels of a training image (:func:`decode_pixels`), which must be an
    aligned 112×112 face; :class:`DataError` naming ``where`` otherwise."""
    try:
        pixels = decode_pixels(data)
    except Exception as err:  # decoders raise assorted types for corrupt data
        raise DataError(f"{where}: cannot decode image ({problem_text(err)})") from None
    if pixels.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{where}: image is {pixels.shape[1]}x{pixels.shape[0]}; training images "
                        f"must be aligned {IMAGE_SIZE}x{IMAGE_SIZE}")
    return pixels
