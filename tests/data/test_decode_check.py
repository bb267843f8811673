"""The decode check (``data.decode_check``) on several training sets: an undecodable image
named and skipped, samples dropped within their set."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fr_distill.config import DataConfig
from fr_distill.data import DataError, preflight, scan
from fr_distill.data.dataset import SampleBytes
from fr_distill.data.decode_check import apply_decode_check, without

pytestmark = pytest.mark.timeout(180)  # loader worker processes: fail, never hang the suite


def test_decode_check_names_and_skips_an_undecodable_image_of_the_second_set(two_sets):
    """Headers intact, no scan data: only the decode check finds it."""
    a, b = two_sets
    header = (Path(a) / "id001" / "0.jpg").read_bytes()
    broken = Path(a) / "id001" / "0a.jpg"  # sorts after 0.jpg: global index 10 + 5
    broken.write_bytes(header[:header.index(b"\xff\xda")] + b"\xff\xd9")
    cfg = DataConfig(train=[b, a], decode_check="on", num_workers=0)
    with pytest.raises(DataError) as err:
        apply_decode_check(preflight(cfg), cfg, "torch")
    assert str(err.value).startswith(f"{broken}: cannot decode image")
    cfg.skip_bad = True
    info = preflight(cfg)
    kept = apply_decode_check(info, cfg, "torch")
    assert kept.num_samples == 22 and [p.num_samples for p in kept.parts] == [10, 12]
    np.testing.assert_array_equal(kept.labels, np.delete(info.labels, 15))
    assert all(SampleBytes(kept).name(i) != str(broken) for i in range(22))


def test_decode_check_drops_samples_within_their_set(two_sets):
    a, b = two_sets
    info = scan([a, b])
    smaller = without(info, [1, 13], ["x", "y"])
    assert smaller.num_samples == 20 and smaller.bad == ["x", "y"]
    assert [p.num_samples for p in smaller.parts] == [11, 9] and smaller.num_classes == 5
    np.testing.assert_array_equal(smaller.labels, np.delete(info.labels, [1, 13]))
    assert SampleBytes(smaller)[12] == SampleBytes(info)[14]
