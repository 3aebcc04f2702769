"""Batch order: a permutation per epoch, a pure function of (seed, epoch), resumable mid-epoch."""
import numpy as np
import pytest

from arraybn.data import batch_indices, num_batches


def test_each_epoch_is_a_fresh_permutation():
    first = np.concatenate(list(batch_indices(10, 3, seed=1, epoch=0)))
    second = np.concatenate(list(batch_indices(10, 3, seed=1, epoch=1)))
    assert sorted(first) == list(range(10)) == sorted(second)
    assert not np.array_equal(first, second)
    assert np.array_equal(first, np.concatenate(list(batch_indices(10, 3, seed=1, epoch=0))))


def test_drop_last_and_batch_counts():
    sizes = [len(b) for b in batch_indices(10, 3, drop_last=True)]
    assert sizes == [3, 3, 3] and num_batches(10, 3, True) == 3
    assert [len(b) for b in batch_indices(10, 3)] == [3, 3, 3, 1] and num_batches(10, 3, False) == 4


def test_starting_mid_epoch_gives_the_remaining_batches():
    full = list(batch_indices(20, 4, seed=7, epoch=3))
    tail = list(batch_indices(20, 4, seed=7, epoch=3, start=2))
    assert all(np.array_equal(a, b) for a, b in zip(full[2:], tail)) and len(tail) == 3


def test_no_shuffle_keeps_order():
    assert np.array_equal(np.concatenate(list(batch_indices(5, 2, shuffle=False))), np.arange(5))


def test_batch_larger_than_data_is_a_clear_error():
    with pytest.raises(ValueError, match="--batch-size"):
        list(batch_indices(5, 8, drop_last=True))
