"""Sequence packing: first-fit-decreasing bin packing and the metadata of a packed row.

Order contract (the C++ op and this reference agree exactly): samples are taken longest first,
ties by smaller index; each goes into the lowest-numbered open bin with room, else a new bin is
opened at the end. Bins are returned in opening order, each listing its sample indices in the
order they were placed.
"""
from __future__ import annotations

import gc
import operator
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from megaswift.kernels import _dispatch


def _as_int_list(lengths: Sequence[int] | torch.Tensor, what: str) -> list[int]:
    if isinstance(lengths, torch.Tensor):
        if lengths.dim() != 1 or lengths.is_floating_point() or lengths.is_complex():
            raise ValueError(f"{what}: expected a 1-D integer tensor, found shape "
                             f"{tuple(lengths.shape)} dtype {lengths.dtype}")
        return lengths.tolist()
    try:
        return [operator.index(x) for x in lengths]
    except TypeError as e:
        raise ValueError(f"{what}: expected a flat sequence of integers ({e})") from None


def check_lengths(lengths: list[int], capacity: int) -> None:
    """Raise ValueError naming the first offending sample; a sample is never split."""
    if int(capacity) != capacity or capacity < 1:
        raise ValueError(f"capacity must be a positive integer, found {capacity!r}")
    for i, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"sample {i} has length {n}; lengths must be >= 1")
        if n > capacity:
            raise ValueError(f"sample {i} has length {n} > capacity {capacity}; samples are never "
                             f"split: truncate it or raise the packing capacity")


def pack_first_fit_decreasing_reference(lengths: Sequence[int] | torch.Tensor,
                                        capacity: int) -> list[list[int]]:
    """Pure-Python first-fit decreasing, O(n log n) with a max segment tree over bin room."""
    lengths = _as_int_list(lengths, "lengths")
    check_lengths(lengths, capacity)
    n = len(lengths)
    if n == 0:
        return []
    size = 1
    while size < n:  # at most n bins can ever be opened
        size *= 2
    room = [capacity] * (2 * size)  # unopened bins have full room, so "leftmost with room" works
    bins: list[list[int]] = []
    for i in sorted(range(n), key=lambda k: (-lengths[k], k)):
        need = lengths[i]
        node = 1
        while node < size:  # descend to the leftmost leaf with enough room
            node = 2 * node if room[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        room[node] -= need
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return bins


def pack_first_fit_decreasing(lengths: Sequence[int] | torch.Tensor, capacity: int) -> list[list[int]]:
    """Bins (lists of sample indices) whose total lengths fit `capacity`; see the module docstring.

    Uses the C++ op when the extension is built, else the pure-Python reference (announced once).
    """
    ext = _dispatch.extension_for("pack_first_fit_decreasing", "cpu")
    if ext is None:
        return pack_first_fit_decreasing_reference(lengths, capacity)
    if isinstance(lengths, torch.Tensor):
        _as_int_list(lengths[:0], "lengths")  # shape/dtype check only
        t = lengths.to(device="cpu", dtype=torch.int64).contiguous()
    else:
        t = torch.tensor(list(lengths)) if len(lengths) else torch.empty(0, dtype=torch.int64)
        if t.dim() != 1 or t.is_floating_point() or t.is_complex():
            raise ValueError(f"lengths must be a flat sequence of integers, found dtype {t.dtype} "
                             f"shape {tuple(t.shape)}")
        t = t.to(torch.int64)
    if t.numel() == 0:
        return []
    if int(capacity) != capacity or capacity < 1:
        raise ValueError(f"capacity must be a positive integer, found {capacity!r}")
    items, offsets = ext.pack_first_fit_decreasing(t, int(capacity))
    flat, bounds = items.tolist(), offsets.tolist()
    with _no_cyclic_gc():
        return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


@contextmanager
def _no_cyclic_gc():
    """Building ~10^5 small lists triggers the cyclic GC over and over (10x the cost of the
    slicing itself); lists of ints form no cycles, so pausing it here loses nothing."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def packed_row_metadata(lengths: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For one packed row holding samples of these lengths, in order: (cu_seqlens, position_ids).

    cu_seqlens is int32 [num_samples + 1] starting at 0 (the flash-attention varlen convention);
    position_ids is int64 [sum(lengths)] and restarts at 0 at every sample boundary.
    """
    ls = torch.as_tensor(_as_int_list(lengths, "lengths"), dtype=torch.int64)
    if ls.numel() and int(ls.min()) < 1:
        raise ValueError(f"lengths must be >= 1, found {ls.tolist()}")
    cu = torch.zeros(ls.numel() + 1, dtype=torch.int64)
    torch.cumsum(ls, 0, out=cu[1:])
    total = int(cu[-1])
    starts = torch.repeat_interleave(cu[:-1], ls)
    position_ids = torch.arange(total, dtype=torch.int64) - starts
    return cu.to(torch.int32), position_ids
