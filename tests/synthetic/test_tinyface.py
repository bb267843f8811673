"""The synthetic TinyFace-style release: layout, image sizes and lists, read by the
evaluator's reader."""
from __future__ import annotations

from pathlib import Path

from .conftest import decode, manifest


def test_tinyface_release_layout_sizes_and_lists(synthetic_data):
    """The evaluator's reader accepts it (it checks the .mat lists against the folders);
    the counts, the low resolutions and the .mat headers (no time stamp) are as planned."""
    from fr_distill.eval.tinyface import load_tinyface

    p = manifest(synthetic_data)["parameters"]
    release = load_tinyface(synthetic_data / "tinyface")
    n, g, k = p["tinyface_identities"], p["tinyface_gallery"], p["tinyface_probes"]
    assert (release.num_probes, release.num_matches, release.num_distractors) == (
        n * k, n * g, p["tinyface_distractors"])
    assert sorted(set(release.labels.tolist())) == [-1, *range(1, n + 1)]
    low, high = p["tinyface_sizes"]
    for path in release.image_paths:
        width, height = decode(Path(path).read_bytes()).shape[1::-1]
        assert low <= height <= high and 0.75 * height - 0.5 <= width <= height
    for mat in sorted(release.testing_set.glob("*.mat")):
        assert mat.read_bytes().startswith(b"MATLAB 5.0 MAT-file, fr_distill synthetic")
