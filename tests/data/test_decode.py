"""The one image decoder: a header declaring a huge size is refused before any pixel is
decoded."""
from __future__ import annotations

import pytest

from conftest import forbid_decoding, lying_jpeg, lying_png
from fr_distill.data import DataError
from fr_distill.data.decode import decode_rgb


@pytest.mark.parametrize("make, width, height", [(lying_jpeg, 30000, 30000),
                                                 (lying_png, 5000, 5000)])
def test_an_image_declaring_a_huge_size_is_refused_before_decoding(make, width, height,
                                                                   monkeypatch):
    """The training decoder (the PyTorch loader's, the decode check's, validate_data's) decoded
    a 632-byte JPEG declaring 30000x30000 pixels in full (2.7 GB) before checking its size; it
    now refuses it from the header (the decoders are tripwires here). The PNG declares less
    than PIL's own decompression-bomb limit."""
    forbid_decoding(monkeypatch)
    with pytest.raises(DataError) as err:
        decode_rgb(make(width, height), "x/y.img")
    assert str(err.value) == (f"x/y.img: cannot decode image (its header declares {width}x"
                              f"{height} pixels, more than 4096x4096; refused before decoding)")
