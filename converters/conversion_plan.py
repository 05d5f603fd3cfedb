"""Which rank of a multi-process conversion writes which tensors.

Every rank computes the same plan from the layout alone (names and byte sizes, known before any data is
read), so the ranks need not talk to agree on it. Greedy largest-first bin packing: tensors sorted by size
(then name, so ties break the same way everywhere) each go to the rank holding the fewest bytes so far (the
lowest rank among equals). A 671B MoE is ~30k tensors of which the largest is ~0.1% of the total, so the
shares come out within a fraction of a percent of each other, and the many equal-sized expert tensors are
dealt round the ranks like cards, spreading every layer's experts evenly.
"""
import heapq
import math
from collections.abc import Mapping

import torch

from converters.mcore_layout import McoreLayout


def tensor_bytes(layout: McoreLayout, dtypes: Mapping[str, torch.dtype]) -> dict[str, int]:
    """Bytes each megatron tensor takes in the output: what a rank reads (about) and writes for it."""
    return {name: math.prod(t.shape) * dtypes[name].itemsize for name, t in layout.tensors.items()}


def plan_shares(sizes: Mapping, ranks: int) -> list[list]:
    """`sizes`: name (a tensor's, or a safetensors shard's index) -> bytes. Returns, per rank, the names it
    handles (largest first); every name is in exactly one share."""
    if ranks < 1:
        raise ValueError(f"a conversion needs at least one rank, got {ranks}")
    shares: list[list[str]] = [[] for _ in range(ranks)]
    loads = [(0, rank) for rank in range(ranks)]  # (bytes so far, rank): a heap, least loaded on top
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        load, rank = heapq.heappop(loads)
        shares[rank].append(name)
        heapq.heappush(loads, (load + sizes[name], rank))
    return shares
