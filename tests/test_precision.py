"""One map from an amp setting to autocast, used by training, evaluation and the benchmarks;
fp32 (alias off) disables autocast everywhere, evaluation on GPUs included."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fr_distill import precision
from fr_distill.eval import extract


@pytest.mark.parametrize("amp, dtype", [("fp32", None), ("off", None), ("fp16", torch.float16),
                                        ("bf16", torch.bfloat16)])
def test_amp_settings_map_to_one_dtype(amp, dtype):
    assert precision.amp_dtype(amp, "cpu") is dtype


def test_bf16_falls_back_to_fp32_on_a_gpu_without_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    assert precision.amp_dtype("bf16", "cuda") is None
    with pytest.raises(ValueError, match="amp must be one of bf16, fp16, fp32, off"):
        precision.amp_dtype("half", "cpu")


class RecordedAutocast:
    """Stands for torch.autocast and records its arguments (no GPU needed to check them)."""

    calls: list[dict] = []

    def __init__(self, device_type, dtype=None, enabled=True):
        RecordedAutocast.calls.append({"device_type": device_type, "dtype": dtype,
                                       "enabled": enabled})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_evaluation_forward_autocasts_only_when_a_dtype_is_asked_for(monkeypatch, device, dtype):
    monkeypatch.setattr(precision.torch, "autocast", RecordedAutocast)
    RecordedAutocast.calls = []
    context = precision.autocast(torch.device(device), dtype)
    assert RecordedAutocast.calls == [{"device_type": device, "dtype": dtype or torch.float32,
                                       "enabled": dtype is not None}]
    assert isinstance(context, RecordedAutocast)
    # the feature extractor enters exactly that context around the model
    RecordedAutocast.calls = []
    model = torch.nn.Flatten()
    images = np.zeros((2, 3, 4, 4), dtype=np.uint8)
    extract.embed_flip_fused(model, images, torch.device("cpu"), dtype)
    assert RecordedAutocast.calls == [{"device_type": "cpu", "dtype": dtype or torch.float32,
                                       "enabled": dtype is not None}]
