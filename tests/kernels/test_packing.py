"""First-fit decreasing packing and packed-row metadata, compiled op against the Python reference."""
import random

import pytest
import torch

from megaswift.kernels import (
    _dispatch,
    pack_first_fit_decreasing,
    pack_first_fit_decreasing_reference,
    packed_row_metadata,
)


def first_fit_decreasing_by_scan(lengths, capacity):
    """Independent oracle: the textbook O(n * bins) scan, same order contract."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for b, r in enumerate(room):
            if r >= lengths[i]:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def random_lengths(seed, n, capacity):
    rng = random.Random(seed)
    # Mix of long and short samples, with many ties, like tokenized chat data.
    choices = lambda: [rng.randint(1, capacity), min(rng.randint(1, 64), capacity), max(capacity // 2, 1)]
    return [rng.choice(choices()) for _ in range(n)]


@pytest.mark.parametrize("seed,n,capacity", [(0, 1, 8), (1, 50, 16), (2, 2000, 4096), (3, 3000, 37)])
def test_reference_matches_textbook_scan(seed, n, capacity):
    lengths = random_lengths(seed, n, capacity)
    assert pack_first_fit_decreasing_reference(lengths, capacity) == first_fit_decreasing_by_scan(lengths, capacity)


@pytest.mark.parametrize("seed,n,capacity", [(4, 1, 1), (5, 777, 100), (6, 20000, 8192), (7, 5000, 1 << 23)])
def test_dispatched_matches_reference_and_is_valid(seed, n, capacity):
    lengths = random_lengths(seed, n, capacity)
    bins = pack_first_fit_decreasing(lengths, capacity)
    assert bins == pack_first_fit_decreasing_reference(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(n))  # every sample exactly once, none split
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # First fit never leaves two bins at most half full.
    assert sum(2 * sum(lengths[i] for i in b) <= capacity for b in bins) <= 1


def first_fit_in_data_order(lengths, capacity):
    """Plain first fit without the sort, to show the case below tells the two apart."""
    bins, room = [], []
    for i, n in enumerate(lengths):
        b = next((b for b, r in enumerate(room) if r >= n), None)
        if b is None:
            bins.append([i])
            room.append(capacity - n)
        else:
            bins[b].append(i)
            room[b] -= n
    return bins


@pytest.mark.parametrize("pack", [pack_first_fit_decreasing, pack_first_fit_decreasing_reference])
def test_a_case_worked_by_hand_where_sorting_first_matters(pack):
    # capacity 10. Decreasing order 8, 7, 5, 4, 3, 2, 1 (indices 6, 3, 1, 2, 5, 0, 4):
    #   8 -> new bin A (room 2); 7 -> new B (3); 5 -> new C (5); 4 -> C (1); 3 -> B (0); 2 -> A (0); 1 -> C (0)
    # = 3 full bins. First fit in data order (2, 5, 4, 7, 1, 3, 8) needs 4: [2,5,1] [4,3] [7] [8].
    lengths, capacity = [2, 5, 4, 7, 1, 3, 8], 10
    assert pack(lengths, capacity) == [[6, 0], [3, 5], [1, 2, 4]]
    assert first_fit_in_data_order(lengths, capacity) == [[0, 1, 4], [2, 5], [3], [6]]


def test_compiled_op_is_used_when_built():
    if _dispatch.why_not_compiled("pack_first_fit_decreasing", "cpu") is not None:
        pytest.skip("csrc not built")
    assert _dispatch.kernel_report()["pack_first_fit_decreasing"]["cpu"].startswith("csrc")


def test_accepts_tensors_and_empty_input():
    lengths = [5, 3, 9, 1, 7]
    assert pack_first_fit_decreasing(torch.tensor(lengths, dtype=torch.int32), 10) == \
        pack_first_fit_decreasing_reference(lengths, 10)
    assert pack_first_fit_decreasing([], 10) == [] and pack_first_fit_decreasing_reference([], 10) == []


@pytest.mark.parametrize("pack", [pack_first_fit_decreasing, pack_first_fit_decreasing_reference])
@pytest.mark.parametrize("lengths,capacity,message", [
    ([3, 11, 2], 10, "sample 1 has length 11 > capacity 10"),
    ([3, 0], 10, "sample 1 has length 0"),
    ([3, -2], 10, "sample 1 has length -2"),
    ([3, 2], 0, "capacity must be"),
    ([1.5, 2], 10, "integers"),
])
def test_bad_input_raises_clear_error(pack, lengths, capacity, message):
    with pytest.raises(ValueError, match=message):
        pack(lengths, capacity)


def test_packed_row_metadata_restarts_positions():
    lengths = [3, 1, 4, 2]
    cu_seqlens, position_ids = packed_row_metadata(lengths)
    assert cu_seqlens.dtype == torch.int32 and position_ids.dtype == torch.int64
    assert cu_seqlens.tolist() == [0, 3, 4, 8, 10]
    assert position_ids.tolist() == [p for n in lengths for p in range(n)]
    cu_empty, pos_empty = packed_row_metadata([])
    assert cu_empty.tolist() == [0] and pos_empty.numel() == 0
    with pytest.raises(ValueError, match=">= 1"):
        packed_row_metadata([2, 0])
