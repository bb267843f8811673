"""Memory bank, METHOD (E3): FIFO order and wrap-around, seeded random updates, state round
trip through a weights-only checkpoint, and resize keeping the newest rows."""
from __future__ import annotations

import io

import pytest
import torch

from fr_distill.losses import ObjectiveInputError
from fr_distill.losses.memory_bank import MemoryBank


def batch(first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows tagged with their sample number: teacher row k = [k, 0], student row k = [0, -k]."""
    ids = torch.arange(first, first + n, dtype=torch.float32)
    return torch.stack([ids, torch.zeros(n)], 1), torch.stack([torch.zeros(n), -ids], 1)


def feed(bank: MemoryBank, sizes: list[int], first: int = 0) -> int:
    for n in sizes:
        bank.enqueue(*batch(first, n))
        first += n
    return first


def ids_of(bank: MemoryBank) -> list[int]:
    teacher, student = bank.filled_rows()
    assert torch.equal(teacher[:, 0], -student[:, 1])  # both buffers hold the same sample per row
    return teacher[:, 0].long().tolist()


def test_fifo_fills_in_order_then_overwrites_the_oldest():
    bank = MemoryBank(5, 2)
    assert bank.filled_rows()[0].shape == (0, 2)
    feed(bank, [2, 2])
    assert ids_of(bank) == [0, 1, 2, 3] and (bank.ptr, bank.filled) == (4, 4)
    feed(bank, [2], first=4)  # wraps: sample 5 lands on row 0
    assert ids_of(bank) == [5, 1, 2, 3, 4] and (bank.ptr, bank.filled, bank.count) == (1, 5, 6)
    assert bank.stamp.tolist() == [5, 1, 2, 3, 4]
    feed(bank, [3], first=6)
    assert ids_of(bank) == [5, 6, 7, 8, 4] and bank.ptr == 4


def test_a_batch_larger_than_the_bank_keeps_its_last_rows():
    bank = MemoryBank(3, 2)
    feed(bank, [1, 5])
    assert sorted(ids_of(bank)) == [3, 4, 5] and bank.count == 6


def test_random_update_fills_first_then_is_reproducible_from_its_seed():
    def run(seed: int) -> MemoryBank:
        bank = MemoryBank(6, 2, update="random", seed=seed)
        feed(bank, [4, 2, 3, 3, 3])
        return bank

    first, again, other = run(7), run(7), run(8)
    assert torch.equal(first.teacher, again.teacher) and torch.equal(first.stamp, again.stamp)
    assert not torch.equal(first.teacher, other.teacher)
    ids = ids_of(first)
    assert len(set(ids)) == 6 and max(ids) == 14  # distinct rows, newest batch present
    assert set(range(12, 15)) <= set(ids)
    fresh = MemoryBank(6, 2, update="random", seed=7)
    feed(fresh, [4, 2])
    assert ids_of(fresh) == [0, 1, 2, 3, 4, 5]  # empty rows are filled in order first


def round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("update", ["fifo", "random"])
def test_state_round_trip_continues_identically(update):
    bank = MemoryBank(5, 2, update=update, seed=3)
    nxt = feed(bank, [2, 2, 2, 2])
    restored = MemoryBank(5, 2, update=update, seed=3)
    restored.load_state_dict(round_trip(bank.state_dict()))
    for b in (bank, restored):
        feed(b, [2, 2], first=nxt)
    assert torch.equal(bank.teacher, restored.teacher)
    assert torch.equal(bank.student, restored.student)
    assert (bank.ptr, bank.filled, bank.count) == (restored.ptr, restored.filled, restored.count)


def test_resize_keeps_the_newest_rows_in_age_order():
    bank = MemoryBank(5, 2)
    nxt = feed(bank, [2, 2, 2, 1])  # samples 0..6 -> holds 2..6
    smaller = MemoryBank(3, 2)
    smaller.load_state_dict(round_trip(bank.state_dict()))
    assert ids_of(smaller) == [4, 5, 6] and (smaller.ptr, smaller.filled) == (0, 3)
    feed(smaller, [1], first=nxt)  # FIFO continues by replacing the oldest kept row
    assert ids_of(smaller) == [7, 5, 6]
    larger = MemoryBank(8, 2)
    larger.load_state_dict(round_trip(bank.state_dict()))
    assert ids_of(larger) == [2, 3, 4, 5, 6] and (larger.ptr, larger.filled) == (5, 5)


def test_state_of_another_dimension_is_refused():
    bank = MemoryBank(4, 3)
    with pytest.raises(ObjectiveInputError, match="embedding dim 2"):
        MemoryBank(4, 2).load_state_dict(bank.state_dict())
