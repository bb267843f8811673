"""World-size-invariant, resumable sampling: every random choice of the input pipeline (METHOD §4).

The order of epoch ``e`` is a permutation of the data set drawn from ``(seed, e)``; global step
``k`` is batch ``k % steps_per_epoch`` of epoch ``k // steps_per_epoch`` (the last partial
global batch of an epoch is dropped). Rank ``r`` of ``W`` takes the contiguous slice
``[r*G/W, (r+1)*G/W)`` of the global batch, so the global batch of a step is the same for
any ``W``, and resuming at step ``k`` needs nothing but ``(seed, k)``. Each sample's
horizontal flip is a hash of ``(seed, epoch, index)``: the DALI path, the PyTorch path and a
resumed run flip the same samples.
"""
from __future__ import annotations

import numpy as np

from .errors import DataError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on a uint64 array (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


class GlobalSampler:
    """Which samples (and flips) each rank reads at each global step."""

    def __init__(self, num_samples: int, global_batch: int, seed: int, flip: bool = True) -> None:
        if global_batch <= 0:
            raise DataError(f"global batch must be > 0, got {global_batch}")
        if num_samples < global_batch:
            raise DataError(f"data set has {num_samples} samples, fewer than one global batch "
                            f"of {global_batch}: lower data.batch_size or the number of ranks")
        self.num_samples, self.global_batch = int(num_samples), int(global_batch)
        self.seed, self.flip = int(seed), bool(flip)
        self.steps_per_epoch = self.num_samples // self.global_batch
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch`` (cached for the current epoch)."""
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._order = rng.permutation(self.num_samples).astype(np.int64)
            self._epoch = epoch
        return self._order

    def global_indices(self, step: int) -> np.ndarray:
        """Data-set indices of the global batch of ``step``."""
        epoch, pos = divmod(int(step), self.steps_per_epoch)
        start = pos * self.global_batch
        return self.permutation(epoch)[start:start + self.global_batch]

    def rank_indices(self, step: int, rank: int, world_size: int) -> np.ndarray:
        """Rank ``rank``'s contiguous slice of the global batch of ``step``."""
        if self.global_batch % world_size:
            raise DataError(f"global batch {self.global_batch} is not divisible by "
                            f"world size {world_size}")
        per_rank = self.global_batch // world_size
        return self.global_indices(step)[rank * per_rank:(rank + 1) * per_rank]

    def flips(self, step: int, indices: np.ndarray) -> np.ndarray:
        """Horizontal-flip flags (bool) of ``indices`` in the epoch of ``step``."""
        if not self.flip:
            return np.zeros(len(indices), dtype=bool)
        epoch = int(step) // self.steps_per_epoch
        key = _splitmix64(np.array([self.seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        key = _splitmix64(key ^ np.uint64(epoch))
        return (_splitmix64(key ^ np.asarray(indices, dtype=np.uint64)) >> np.uint64(63)) == 1

    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume this order (plus the step)."""
        return {"seed": self.seed, "num_samples": self.num_samples,
                "global_batch": self.global_batch, "flip": self.flip}
