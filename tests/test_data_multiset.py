"""Several training sets in ``data.train``: label offsets, the global index, both loaders, the
sampler's world-size invariance and resume, the teacher cache's data identity, the run plan,
and each bad-input message (including a folder given one level too deep or too shallow)."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, write_jpeg_folder
from fr_distill.config import ConfigError, DataConfig, check_paths, load_config
from fr_distill.data import DataError, build_train_loader, preflight, scan
from fr_distill.data.convert import folder_to_recordio
from fr_distill.data.dataset import SampleBytes
from fr_distill.data.decode_check import apply_decode_check, without
from fr_distill.engine.plan import make_plan
from fr_distill.teacher_cache.identity import data_identity, first_difference, identity

pytestmark = pytest.mark.timeout(180)  # loader worker processes: fail, never hang the suite


@pytest.fixture
def two_sets(tmp_path) -> tuple[str, str]:
    """Set a: a folder of 3 identities × 4 JPEGs; set b: a RecordIO pair (InsightFace layout,
    ``property`` file) of 2 identities × 5 JPEGs, in b/train.rec."""
    a = write_jpeg_folder(tmp_path / "a", 3, 4, seed=1)
    source = write_jpeg_folder(tmp_path / "b_source", 2, 5, seed=2)
    (tmp_path / "b").mkdir()
    folder_to_recordio(source, tmp_path / "b" / "train.rec", seed=3)
    return str(a), str(tmp_path / "b")


def message(train, **kw) -> str:
    with pytest.raises(DataError) as err:
        preflight(DataConfig(train=train, **kw))
    assert "\n" not in str(err.value)
    return str(err.value)


def test_labels_are_offset_by_the_earlier_sets_class_counts(two_sets):
    a, b = two_sets
    info = preflight(DataConfig(train=[a, b]))
    assert (info.num_samples, info.num_classes, info.format) == (22, 5, "folder+recordio")
    assert info.label_offsets() == [0, 3] and info.sample_starts() == [0, 12]
    np.testing.assert_array_equal(info.labels[:12], [0] * 4 + [1] * 4 + [2] * 4)
    set_b = preflight(DataConfig(train=b))
    np.testing.assert_array_equal(info.labels[12:], set_b.labels + 3)
    assert sorted(set(info.labels[12:].tolist())) == [3, 4]
    swapped = preflight(DataConfig(train=[b, a]))
    np.testing.assert_array_equal(swapped.labels[:10], set_b.labels)
    np.testing.assert_array_equal(swapped.labels[10:], [2] * 4 + [3] * 4 + [4] * 4)


def test_global_index_reads_the_right_set_and_sample(two_sets):
    a, b = two_sets
    images = SampleBytes(preflight(DataConfig(train=[a, b])))
    first, second = SampleBytes(preflight(DataConfig(train=a))), SampleBytes(
        preflight(DataConfig(train=b)))
    assert len(images) == 22
    for i in range(22):
        part, j = (first, i) if i < 12 else (second, i - 12)
        assert images[i] == part[j] and images.name(i) == part.name(j)
    assert images.name(0) == f"{a}/id000/0.jpg"
    assert images.name(12).startswith(f"{b}/train.rec record ")


def test_a_single_string_is_the_set_it_always_was(two_sets):
    a, _ = two_sets
    alone, listed = scan(a), scan([a])
    assert alone.parts == [] and alone.format == "folder" and alone.root == a
    for info in (alone, listed):
        assert (info.num_samples, info.num_classes) == (12, 3)
        np.testing.assert_array_equal(info.samples, alone.samples)
        np.testing.assert_array_equal(info.labels, alone.labels)
    assert data_identity(listed) == data_identity(alone)
    assert load_config(None, [f"data.train={a}"]).data.train == a


def test_config_takes_a_list_from_an_override_or_yaml(two_sets, tmp_path):
    a, b = two_sets
    assert load_config(None, [f"data.train=[{a}, {b}]"]).data.train == [a, b]
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  train:\n    - {a}\n    - {b}\nloss:\n  iled: {{weight: 0}}\n"
                      f"  rpsd: {{weight: 0}}\n")
    cfg = load_config(config)
    assert cfg.data.train == [a, b]
    check_paths(cfg)
    with pytest.raises(ConfigError) as err:
        check_paths(load_config(config, [f"data.train=[{a}, {tmp_path / 'gone'}]"]))
    assert str(err.value) == f"config key 'data.train[1]': path not found: {tmp_path / 'gone'}"
    with pytest.raises(ConfigError) as err:
        check_paths(load_config(config, [f"data.train=[{a}, '']"]))
    assert str(err.value) == "config key 'data.train[1]' is empty: name an image folder or train.rec"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.train=5"])
    assert str(err.value) == "command line: config key 'data.train' must be str or list, got 5"
    with pytest.raises(ConfigError, match=r"config key 'data.train\[1\]' must be str, got 3"):
        load_config(None, [f"data.train=[{a}, 3]"])


def loader_batches(train, batch_size, start, steps, rank=0, world=1, loader="torch"):
    cfg = DataConfig(train=train, batch_size=batch_size, num_workers=0 if loader == "torch" else 1,
                     loader=loader)
    info = preflight(cfg)
    return list(itertools.islice(build_train_loader(cfg, info, rank, world, "cpu", 7)
                                 .iterate(start), steps))


def test_two_sets_resume_and_rank_slices_match_the_one_rank_run(two_sets):
    """Steps 0..7 at global batch 4 (5 steps per epoch: crosses into epoch 1, mid-epoch
    resume at step 3); 2 ranks of 2 join to the 1-rank batch, bitwise."""
    train = list(two_sets)
    run = loader_batches(train, 4, 0, 8)
    seen = torch.cat([batch.indices for batch in run[:5]])
    assert len(set(seen.tolist())) == 20 and seen.max() >= 12 and seen.min() < 12  # both sets
    for resumed_from in (3, 5):
        for a, b in zip(run[resumed_from:], loader_batches(train, 4, resumed_from, 8 - resumed_from)):
            assert torch.equal(a.indices, b.indices) and torch.equal(a.flips, b.flips)
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    halves = [loader_batches(train, 2, 3, 5, rank=r, world=2) for r in (0, 1)]
    for step in range(5):
        for field in ("images", "labels", "indices", "flips"):
            joined = torch.cat([getattr(halves[0][step], field), getattr(halves[1][step], field)])
            assert torch.equal(joined, getattr(run[3 + step], field)), (step, field)


def test_dali_reads_two_sets_as_the_pytorch_loader(two_sets):
    train = list(two_sets)
    for a, b in zip(loader_batches(train, 4, 2, 3), loader_batches(train, 4, 2, 3, loader="dali")):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
        assert (a.images - b.images).abs().max() <= 2 / 127.5  # JPEG decoder tolerance


def test_teacher_cache_of_two_sets_is_refused_for_one_set_or_the_other_order(two_sets, tmp_path):
    a, b = two_sets
    c = str(write_jpeg_folder(tmp_path / "c", 4, 3))  # 12 images as a: [a, c] and [c, a] differ
    # only in the digest (the order of the labels)

    def run(train):
        cfg = load_config(None, [f"data.train={json.dumps(train)}", "data.loader=torch"])
        return cfg, identity(cfg, scan(train), torch.device("cpu"), "0" * 64, True)

    cfg, built = run([a, b])
    assert first_difference(built, run([a, b])[1], "C", cfg) is None
    for train, theirs in (([a], "folder"), ([b, a], "recordio+folder"),
                          ([a, b, c], "folder+recordio+folder")):
        cfg, other = run(train)
        assert first_difference(built, other, "C", cfg) == (
            f"teacher.cache C was built for other data: its format is folder+recordio, data.train "
            f"[{', '.join(train)}] has {theirs}")
    _, folders = run([a, c])
    cfg, swapped = run([c, a])
    assert first_difference(folders, swapped, "C", cfg).startswith(
        "teacher.cache C was built for other data: its digest is ")


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


def test_bad_lists_name_the_entry(two_sets, tmp_path):
    a, b = two_sets
    assert message([a, str(tmp_path / "gone")]) == (
        f"data.train[1]: {tmp_path / 'gone'}: training data path does not exist")
    assert message([]) == ("config key 'data.train' is an empty list: name one or more image "
                           "folders or train.rec files")
    assert message([a, ""]) == ("config key 'data.train[1]' is empty: name an image folder or "
                                "a train.rec")
    assert message([a, b, a + "/"]) == (
        f"data.train[2] {a}/: the same set as data.train[0]; a set listed twice would give its "
        f"identities two labels")
    (tmp_path / "a" / "id001" / "bad.jpg").write_bytes(b"junk")
    assert message([b, a]).startswith(f"{tmp_path / 'a' / 'id001' / 'bad.jpg'}: not a JPEG")


def test_a_folder_one_level_too_deep_or_too_shallow_is_named_with_the_right_path(tmp_path):
    root = tmp_path / "data"
    write_jpeg_folder(root / "webface" / "faces", 2, 1)  # root/set/faces/id/img.jpg
    deep = root / "webface"
    assert message(str(deep)) == (
        f"{deep}: its sub-folders hold folders of images (e.g. {deep / 'faces' / 'id000'}), one "
        f"level too deep: set data.train to {deep / 'faces'}")
    write_jpeg_folder(root / "vgg", 2, 1)
    assert message(str(root)) == (
        f"{root}: its sub-folders hold folders of images (e.g. {root / 'vgg' / 'id000'}), one "
        f"level too deep: set data.train to {root / 'vgg'}, or a list of all 2 sub-folders of "
        f"{root}")
    shallow = root / "vgg" / "id001"
    assert message([str(root / "vgg"), str(shallow)]) == (
        f"data.train[1]: {shallow}: holds 1 files but no identity sub-folder with images, one "
        f"level too shallow (is this one identity's folder?): data.train must name the folder "
        f"holding one sub-folder per identity, e.g. {root / 'vgg'}")
    rec_parent = tmp_path / "download"
    folder_to_recordio(root / "vgg", tmp_path / "faces_emore.rec")
    (rec_parent / "faces_emore").mkdir(parents=True)
    for name in ("faces_emore.rec", "faces_emore.idx"):
        (tmp_path / name).rename(rec_parent / "faces_emore" / name.replace("faces_emore", "train"))
    assert message(str(rec_parent)) == (
        f"{rec_parent}: a RecordIO set in its sub-folder {rec_parent / 'faces_emore'}, one level "
        f"too deep: set data.train to {rec_parent / 'faces_emore'}")
    assert preflight(DataConfig(train=str(rec_parent / "faces_emore"))).num_samples == 2


def test_validate_data_takes_several_sets(two_sets):
    a, b = two_sets
    proc = subprocess.run([sys.executable, "tools/validate_data.py", a, b, "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"{a}, {b}/train.rec (folder+recordio): 22 images in 5 classes" in proc.stdout
    assert "  0:id002: 4\n  1:0: 5\n  1:1: 5\n" in proc.stdout
