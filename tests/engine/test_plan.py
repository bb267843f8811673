"""The run plan of several training sets: each listed with its labels."""
from __future__ import annotations

import pytest

from fr_distill.config import load_config
from fr_distill.data import scan
from fr_distill.engine.plan import make_plan


@pytest.mark.timeout(180)
def test_plan_lists_each_set_with_its_offset(two_sets):
    a, b = two_sets
    cfg = load_config(None, [f"data.train=[{a}, {b}]", "data.batch_size=4"])
    lines = make_plan(cfg, scan(cfg.data.train), 1, None, None).describe(cfg).splitlines()
    assert lines[:3] == [
        "data      2 sets (folder+recordio): 22 images, 5 identities",
        f"  set 0   {a} (folder): 12 images, 3 identities, labels 0-2",
        f"  set 1   {b}/train.rec (recordio): 10 images, 2 identities, labels 3-4"]
    single = make_plan(cfg, scan(a), 1, None, None).describe(load_config(None, [f"data.train={a}"]))
    assert single.splitlines()[0] == f"data      {a} (folder): 12 images, 3 identities"
    assert single.splitlines()[1].startswith("student ")
