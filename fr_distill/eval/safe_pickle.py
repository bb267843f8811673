"""Restricted unpickling of verification `.bin` files (METHOD V1).

A `.bin` file is a pickle of ``(bins, issame_list)``. Unpickling an untrusted pickle with the
standard unpickler can run arbitrary code (any callable reachable by ``GLOBAL`` / ``REDUCE``),
so this module admits only the globals needed to rebuild bytes, str, list, tuple, bool,
int, float and numpy **bool** arrays, and checks each reconstructed numpy array's dtype.
Anything else is refused with :class:`EvalDataError` before it is called
(:class:`fr_distill.unpickling.AllowlistUnpickler`).
"""
from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np

try:
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct

from fr_distill.paths import read_regular
from fr_distill.unpickling import AllowlistUnpickler

from .errors import EvalDataError


def _checked_reconstruct(subtype, shape, dtype_code):
    """numpy's ``_reconstruct`` for plain ``ndarray`` only (its dtype comes from ``_checked_dtype``)."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array subtype {subtype!r} is not allowed")
    return _numpy_reconstruct(subtype, shape, dtype_code)


def _checked_frombuffer(buffer, dtype, shape, order):
    """numpy's protocol-5 array rebuild, for bool arrays only."""
    if not isinstance(dtype, np.dtype) or dtype != np.dtype(bool):
        raise pickle.UnpicklingError(f"numpy dtype {dtype!r} is not allowed (only bool)")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order).copy()


def _checked_dtype(code, *args):
    """``numpy.dtype`` restricted to bool."""
    if code not in ("b1", "?", b"b1", bool):
        raise pickle.UnpicklingError(f"numpy dtype {code!r} is not allowed (only bool)")
    dtype = np.dtype(code.decode() if isinstance(code, bytes) else code, *args)
    if dtype != np.dtype(bool):
        raise pickle.UnpicklingError(f"numpy dtype {dtype} is not allowed (only bool)")
    return dtype


def _checked_encode(obj, encoding="utf-8"):
    if not isinstance(obj, str) or encoding != "latin1":
        raise pickle.UnpicklingError("_codecs.encode is allowed only as str->latin1 bytes")
    return obj.encode("latin1")


def _checked_bytearray(*args):
    if not all(isinstance(a, (bytes, str, int)) for a in args):
        raise pickle.UnpicklingError("bytearray from a non-bytes argument is not allowed")
    return bytearray(*args)


# The globals a numpy bool array (and a Python-2 era bytes payload) pickle refers to, each
# resolved to a checked version. ``_reconstruct`` (protocols 0-4) and ``_frombuffer``
# (protocol 5) live in ``numpy.core.multiarray`` (numpy 1.x pickles) or
# ``numpy._core.multiarray`` (numpy 2.x pickles); ``_codecs.encode`` is how protocol-2
# pickles written by Python 3 spell a bytes object.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _checked_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _checked_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _checked_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _checked_frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _checked_dtype,
    ("_codecs", "encode"): _checked_encode,
    ("builtins", "bytearray"): _checked_bytearray,
}


class RestrictedUnpickler(AllowlistUnpickler):
    """Unpickler that resolves only the globals of :data:`_ALLOWED`."""

    allowed = _ALLOWED


def _check_values(obj: Any, path: str, depth: int = 0) -> None:
    """Reject anything but the admitted plain types (and bool arrays) anywhere in ``obj``."""
    if depth > 4:
        raise EvalDataError(f"{path}: nesting deeper than a (bins, issame) pickle allows")
    if isinstance(obj, (bytes, bytearray, str, bool, int, float)) or obj is None:
        return
    if isinstance(obj, np.ndarray):
        if obj.dtype != np.dtype(bool):
            raise EvalDataError(f"{path}: numpy array of dtype {obj.dtype} is not allowed")
        return
    if isinstance(obj, (list, tuple)):
        for item in obj:
            _check_values(item, path, depth + 1)
        return
    raise EvalDataError(f"{path}: object of type {type(obj).__name__} is not allowed")


def safe_load(path: str) -> Any:
    """Unpickle ``path`` admitting only plain data and numpy bool arrays.

    Raises :class:`EvalDataError` (one line, naming the file and the refused global/type)
    for anything else; nothing from the file is executed.
    """
    try:
        data = read_regular(path)  # a FIFO or a device would block or never end
    except OSError as err:
        raise EvalDataError(f"{path}: cannot read ({err.strerror})") from None
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as err:
        raise EvalDataError(f"{path}: refused or malformed pickle: {err}") from None
    _check_values(obj, path)
    return obj
