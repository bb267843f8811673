"""Reading and decoding face images for evaluation: regular files only
(:func:`fr_distill.paths.read_regular`), decoded by the project's one decoder
(:func:`fr_distill.data.decode.decode_pixels`, which refuses a header declaring a huge image
before decoding it)."""
from __future__ import annotations

import numpy as np

from fr_distill.data.decode import decode_pixels, problem_text
from fr_distill.paths import read_regular

from .errors import EvalDataError


def decode_image(payload: bytes, file: str, what: str) -> np.ndarray:
    """RGB ``H×W×3`` uint8 of ``payload``; :class:`EvalDataError` naming ``file`` and ``what``."""
    try:
        return decode_pixels(payload)
    except Exception as err:  # any decoder failure is a bad record
        raise EvalDataError(f"{file}: {what} cannot be decoded ({problem_text(err)})") from None


def read_image_bytes(path: str) -> bytes:
    """The encoded bytes of the image file ``path`` (a regular file); :class:`EvalDataError`
    naming it otherwise."""
    try:
        return read_regular(path)
    except OSError as err:
        raise EvalDataError(f"{path}: cannot read image ({err.strerror or err})") from None


def read_image(path: str) -> np.ndarray:
    """RGB ``H×W×3`` uint8 of the image file ``path``; :class:`EvalDataError` naming it."""
    return decode_image(read_image_bytes(path), path, "image")
