"""The DALI (CPU) and PyTorch loaders against each other and an independent PIL decode, on one
training set and on several; a label out of range refused on the host."""
from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from fr_distill.config import DataConfig
from fr_distill.data import DataError, RecordIOReader, build_train_loader, preflight
from fr_distill.data import loader as loader_module
from fr_distill.data.convert import folder_to_recordio

pytestmark = pytest.mark.timeout(180)  # loader worker processes: fail, never hang the suite

STEPS = 3  # steps 4, 5, 6 of 6 per epoch: crosses into epoch 1


def reference_images(info, indices, flips) -> torch.Tensor:
    """PIL decode, flip and (x/255 - 0.5)/0.5 normalize, independently of the loaders."""
    out = []
    for index, flip in zip(indices, flips):
        if info.format == "folder":
            img = Image.open(f"{info.root}/{info.samples[index].decode()}").convert("RGB")
        else:
            data = RecordIOReader(info.root, info.idx_path).read(int(info.samples[index]))[1]
            img = Image.open(io.BytesIO(data)).convert("RGB")
        x = np.asarray(img, dtype=np.float32)
        if flip:
            x = x[:, ::-1]
        out.append(torch.from_numpy((x / 255 - 0.5) / 0.5).permute(2, 0, 1))
    return torch.stack(out)


def batches(cfg, info, start=4, rank=0, world=1, seed=7):
    return list(itertools.islice(
        build_train_loader(cfg, info, rank, world, "cpu", seed).iterate(start), STEPS))


@pytest.mark.parametrize("fmt", ["folder", "recordio"])
def test_dali_and_torch_agree_with_the_sampler_and_a_pil_decode(fmt, jpeg_folder, tmp_path):
    train = jpeg_folder
    if fmt == "recordio":  # InsightFace layout, header record included
        folder_to_recordio(jpeg_folder, tmp_path / "train.rec", seed=2)
        train = tmp_path / "train.rec"
    cfg = DataConfig(train=str(train), batch_size=4, num_workers=1)
    info = preflight(cfg)
    cfg.loader = "torch"
    fallback = batches(cfg, info)
    cfg.loader = "dali"
    dali = batches(cfg, info)
    loader = build_train_loader(cfg, info, 0, 1, "cpu", 7)
    assert loader.steps_per_epoch == 6 and loader.global_batch == 4
    flipped_seen = 0
    for step, a, b in zip(range(4, 4 + STEPS), fallback, dali):
        expected = loader.sampler.global_indices(step)
        np.testing.assert_array_equal(a.indices.numpy(), expected)
        np.testing.assert_array_equal(b.indices.numpy(), expected)
        assert torch.equal(a.labels, b.labels) and a.labels.dtype == b.labels.dtype == torch.int64
        torch.testing.assert_close(a.labels, torch.from_numpy(info.labels[expected]))
        flips = loader.sampler.flips(step, expected)
        reference = reference_images(info, expected, flips)
        for got in (a.images, b.images):
            assert got.shape == (4, 3, 112, 112) and got.dtype == torch.float32
            assert (got - reference).abs().max() <= 2 / 127.5  # JPEG decoder tolerance
        unflipped = reference_images(info, expected, ~flips)
        for i in np.flatnonzero(flips):
            flipped_seen += 1
            assert (b.images[i] - unflipped[i]).abs().mean() > 0.1  # the flip really happened
    assert flipped_seen > 0


def test_resume_and_rank_slices_match_the_one_rank_run(jpeg_folder):
    cfg = DataConfig(train=str(jpeg_folder), batch_size=4, num_workers=0, loader="torch")
    info = preflight(cfg)
    run = list(itertools.islice(build_train_loader(cfg, info, 0, 1, "cpu", 7).iterate(0), 9))
    resumed = batches(cfg, info, start=6)
    for a, b in zip(run[6:], resumed):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    cfg.batch_size = 2  # same global batch 4 over 2 ranks
    halves = [batches(cfg, info, start=6, rank=r, world=2) for r in (0, 1)]
    for step in range(STEPS):
        joined = torch.cat([halves[0][step].images, halves[1][step].images])
        assert torch.equal(joined, run[6 + step].images)
        assert torch.equal(torch.cat([halves[0][step].labels, halves[1][step].labels]),
                           run[6 + step].labels)


def test_backend_selection(monkeypatch, jpeg_folder):
    cfg = DataConfig(train=str(jpeg_folder), batch_size=4)
    info = preflight(cfg)
    assert build_train_loader(cfg, info, 0, 1, "cpu", 0).backend == "dali"
    monkeypatch.setattr(loader_module, "dali_available", lambda: False)
    assert build_train_loader(cfg, info, 0, 1, "cpu", 0).backend == "torch"
    cfg.loader = "dali"
    with pytest.raises(DataError, match="data.loader is 'dali' but nvidia.dali is not installed"):
        build_train_loader(cfg, info, 0, 1, "cpu", 0)


def test_batch_source_survives_pickling_for_spawned_workers(jpeg_folder, tmp_path):
    """With CUDA initialized the DALI workers are spawned: the source travels pickled."""
    import pickle
    from types import SimpleNamespace

    from fr_distill.data.dali import BatchSource
    from fr_distill.data.dataset import SampleBytes
    from fr_distill.data.sampler import GlobalSampler

    folder_to_recordio(jpeg_folder, tmp_path / "train.rec", seed=2)
    info = preflight(DataConfig(train=str(tmp_path / "train.rec")))
    source = BatchSource(SampleBytes(info), GlobalSampler(24, 8, seed=1), 5, 1, 2)
    first = source(SimpleNamespace(iteration=2))
    copy = pickle.loads(pickle.dumps(source))
    again = copy(SimpleNamespace(iteration=2))
    assert [a.tobytes() for a in first[0]] == [a.tobytes() for a in again[0]]
    np.testing.assert_array_equal(first[1], again[1])
    np.testing.assert_array_equal(again[2], GlobalSampler(24, 8, seed=1).rank_indices(7, 1, 2))


@pytest.mark.parametrize("bad", ["small", "corrupt", "missing"])
def test_bad_image_without_preflight_is_a_one_line_error_naming_it(bad, jpeg_folder, tmp_path):
    path = jpeg_folder / "id000" / "bad.jpg"
    if bad == "small":
        Image.new("RGB", (100, 100)).save(path)
    elif bad == "corrupt":
        path.write_bytes(b"\xff\xd8\xff" + bytes(300))
    else:
        path.symlink_to(tmp_path / "gone.jpg")
    cfg = DataConfig(train=str(jpeg_folder), batch_size=25, num_workers=1, preflight=False)
    info = preflight(cfg)
    for backend in ("torch", "dali"):  # fork DataLoader workers before any DALI threads exist
        cfg.loader = backend
        with pytest.raises(DataError) as err:
            next(build_train_loader(cfg, info, 0, 1, "cpu", 0).iterate(0))
        assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_dali_with_spawned_workers_matches_forked(monkeypatch, jpeg_folder):
    """Once CUDA is initialized (always, in training on GPUs) the DALI workers are spawned."""
    from fr_distill.data import dali

    cfg = DataConfig(train=str(jpeg_folder), batch_size=4, num_workers=1, loader="dali")
    info = preflight(cfg)
    forked = batches(cfg, info, start=2)
    monkeypatch.setattr(dali.torch.cuda, "is_initialized", lambda: True)
    spawned = batches(cfg, info, start=2)
    for a, b in zip(forked, spawned):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)


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


def test_loader_refuses_an_out_of_range_label_on_the_host(synthetic_data):
    """A label at or above the class count (an index edited after the pre-flight check)
    stops the loader with one line naming the data set, the sample and the label."""
    cfg = DataConfig(train=str(synthetic_data / "train"), loader="torch", num_workers=0,
                     batch_size=8)
    info = preflight(cfg)
    info.labels = info.labels.copy()
    loader = build_train_loader(cfg, info, 0, 1, "cpu", seed=0)
    first = loader.sampler.rank_indices(0, 0, 1)
    info.labels[first[3]] = info.num_classes
    with pytest.raises(DataError) as err:
        next(loader.iterate(0))
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"{info.root}: sample {first[3]} has label {info.num_classes}, outside "
                       f"[0, {info.num_classes})")
    assert np.all(info.labels[first[:3]] < info.num_classes)
