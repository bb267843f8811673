"""The sampler: world-size invariance, resume, per-epoch orders, deterministic flips."""
from __future__ import annotations

import numpy as np
import pytest

from fr_distill.data import DataError, GlobalSampler

N, G = 103, 8  # 12 full global batches per epoch, 7 samples dropped


def test_same_global_batches_for_any_world_size():
    sampler = GlobalSampler(N, G, seed=5)
    for step in range(0, 40, 3):
        full = sampler.global_indices(step)
        for world in (1, 2, 4):
            slices = [GlobalSampler(N, G, seed=5).rank_indices(step, r, world) for r in range(world)]
            assert all(len(s) == G // world for s in slices)
            np.testing.assert_array_equal(np.concatenate(slices), full)


def test_epoch_is_a_permutation_without_repeats_and_drops_the_partial_batch():
    sampler = GlobalSampler(N, G, seed=1)
    assert sampler.steps_per_epoch == N // G == 12
    epoch = np.concatenate([sampler.global_indices(k) for k in range(12)])
    assert len(np.unique(epoch)) == len(epoch) == 96
    np.testing.assert_array_equal(epoch, sampler.permutation(0)[:96])
    assert set(epoch) <= set(range(N))


def test_epochs_and_seeds_differ():
    a = GlobalSampler(N, G, seed=1)
    assert not np.array_equal(a.global_indices(0), a.global_indices(12))  # epoch 0 vs 1
    assert not np.array_equal(a.permutation(0), a.permutation(1))
    assert not np.array_equal(a.permutation(0), GlobalSampler(N, G, seed=2).permutation(0))


def test_resume_at_step_k_reproduces_the_remaining_order():
    k = 17
    straight = GlobalSampler(N, G, seed=3)
    run = [straight.global_indices(s) for s in range(40)]
    flips = [straight.flips(s, run[s]) for s in range(40)]
    resumed = GlobalSampler(**{key: v for key, v in straight.state_dict().items()})
    for s in range(k, 40):
        np.testing.assert_array_equal(resumed.global_indices(s), run[s])
        np.testing.assert_array_equal(resumed.flips(s, resumed.global_indices(s)), flips[s])


def test_flips_depend_on_seed_epoch_and_index_only():
    sampler = GlobalSampler(1000, 100, seed=9)
    idx = np.arange(1000)
    f0 = sampler.flips(0, idx)
    assert 400 < f0.sum() < 600  # a fair coin
    np.testing.assert_array_equal(sampler.flips(9, idx), f0)  # same epoch (steps 0..9)
    assert (sampler.flips(10, idx) != f0).sum() > 300  # next epoch: fresh flips
    assert (GlobalSampler(1000, 100, seed=10).flips(0, idx) != f0).sum() > 300
    np.testing.assert_array_equal(sampler.flips(0, idx[::-1]), f0[::-1])  # per index
    assert not GlobalSampler(1000, 100, seed=9, flip=False).flips(0, idx).any()


def test_too_small_data_set_and_indivisible_world_size_are_errors():
    with pytest.raises(DataError, match="fewer than one global batch of 16"):
        GlobalSampler(10, 16, seed=0)
    with pytest.raises(DataError, match="not divisible by world size 3"):
        GlobalSampler(N, G, seed=0).rank_indices(0, 0, 3)
