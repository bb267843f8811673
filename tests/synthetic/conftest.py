"""Helpers of the synthetic data set tests: a JPEG decode, the data set's manifest, the
arguments of a small ``tools/make_synthetic.py`` run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import simplejpeg


TOOL_ARGS = ["--identities", "3", "--images", "2", "--bin-identities", "4", "--bin-pairs", "20",
             "--ijb-subjects", "2", "--ijb-max-media", "1", "--workers", "1"]


def decode(data: bytes) -> np.ndarray:
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())
