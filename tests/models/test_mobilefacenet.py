"""MobileFaceNet: the arcface_torch layout, its parameter count and shapes, a float32
embedding under autocast."""
from __future__ import annotations

import torch

from fr_distill.models import get_backbone
from .conftest import images, on_meta


def mobilefacenet_param_count(dim: int) -> int:
    """arcface_torch MobileFaceNet (blocks 1,4,6,2; scale 2) by the architecture formula."""
    def cbp(cin, cout, k=1, groups=1):
        return cin // groups * cout * k * k + 3 * cout

    def cb(cin, cout, k=1, groups=1):
        return cin // groups * cout * k * k + 2 * cout

    def inverted(cin, cout, expanded):
        return cbp(cin, expanded) + cbp(expanded, expanded, 3, expanded) + cb(expanded, cout)

    return (cbp(3, 128, 3) + cbp(128, 128, 3, 64)
            + inverted(128, 128, 128) + 4 * inverted(128, 128, 128)
            + inverted(128, 256, 256) + 6 * inverted(256, 256, 256)
            + inverted(256, 256, 512) + 2 * inverted(256, 256, 256)
            + cbp(256, 512) + cb(512, 512, 7, 512) + 512 * dim + 2 * dim)


def test_mobilefacenet_layout_count_and_shapes():
    meta = on_meta("mobilefacenet", 256)
    assert sum(p.numel() for p in meta.parameters()) == mobilefacenet_param_count(256)
    state = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    assert state["layers.0.layers.0.weight"] == (128, 3, 3, 3)
    assert state["layers.1.layers.0.weight"] == (128, 2, 3, 3)
    assert state["layers.3.layers.3.layers.1.layers.0.weight"] == (128, 1, 3, 3)
    assert state["layers.6.layers.0.layers.0.weight"] == (512, 256, 1, 1)
    assert state["conv_sep.layers.0.weight"] == (512, 256, 1, 1)
    assert state["features.layers.0.layers.0.weight"] == (512, 1, 7, 7)
    assert state["features.layers.2.weight"] == (256, 512)
    assert state["features.layers.3.running_var"] == (256,)
    model = get_backbone("mobilefacenet", 64, width=0.25).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(3))
    assert out.shape == (3, 64) and out.dtype == torch.float32 and torch.isfinite(out).all()
