"""Named tensor transforms between HF and megatron-core layouts, each with both directions.

`to_mcore(hf_tensors, dims, mcore_shape)` builds one megatron-core tensor from the HF tensors a rule
names, by the transform's row placement; `to_hf(mcore_tensor, dims)` gives them back, in the same
order. Both only move rows, so a round trip is bit-exact. The expected HF shapes are derived by running
`to_hf` on a meta tensor of the megatron-core shape, so no shape table is kept twice.
"""
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Dims:
    """The sizes transforms need, read from the HF config."""
    num_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int


Block = tuple[int, int, int]  # (first row in the HF tensor, first row in the megatron tensor, rows)


@dataclass(frozen=True)
class Transform:
    """`placement(dims, mcore_shape)` says, for each HF tensor in rule order, which of its rows
    (along dim 0) land where in the megatron-core tensor; rows no block covers are zeros (vocab
    padding). It is the one description of the fused layout: `to_mcore` assembles tensors in memory
    from it, and hf2mcore reads each block from disk straight into its place. `to_hf` is its inverse."""
    name: str
    placement: Callable[[Dims, tuple[int, ...]], list[list[Block]]]
    to_hf: Callable[[torch.Tensor, Dims], list[torch.Tensor]]

    def to_mcore(self, hf: list[torch.Tensor], dims: Dims, shape: tuple[int, ...]) -> torch.Tensor:
        placement = self.placement(dims, shape)
        if len(hf) == 1 and tuple(hf[0].shape) == tuple(shape) and placement == [[(0, 0, shape[0])]]:
            return hf[0]  # nothing moves: no copy
        if len({t.dtype for t in hf}) > 1:
            raise ValueError(f"tensors fused into one have different dtypes: {[t.dtype for t in hf]}")
        out = empty_placed(shape, hf[0].dtype, placement)
        for tensor, blocks in zip(hf, placement):
            for src, dst, rows in blocks:
                out[dst:dst + rows] = tensor[src:src + rows]
        return out


def empty_placed(shape: tuple[int, ...], dtype: torch.dtype, placement: list[list[Block]]) -> torch.Tensor:
    """An uninitialised tensor for `placement` to fill, with the rows it leaves uncovered zeroed."""
    out = torch.empty(shape, dtype=dtype)
    covered = sorted((dst, dst + rows) for blocks in placement for _, dst, rows in blocks)
    row = 0
    for start, end in covered + [(shape[0], shape[0])]:
        if start > row:
            out[row:start].zero_()
        row = max(row, end)
    return out


# --- identity: same tensor under another name ------------------------------------------------------
IDENTITY = Transform("identity", lambda dims, shape: [[(0, 0, shape[0])]], lambda t, dims: [t])


# --- fused QKV --------------------------------------------------------------------------------------
# megatron-core's linear_qkv holds, for each query group g in turn: the group's q heads, its k head,
# its v head (rows of head_dim each). TP splits this tensor by whole groups, so the layout is TP-free:
#     [ q(g0 heads) | k(g0) | v(g0) | q(g1 heads) | k(g1) | v(g1) | ... ]
# HF keeps q_proj [heads*d], k_proj [groups*d], v_proj [groups*d] apart. Works for weights and biases.
def _qkv_rows(dims: Dims) -> tuple[int, int]:
    """Rows of one group's q heads, and of one group in the fused tensor."""
    q_rows = dims.num_heads // dims.num_query_groups * dims.head_dim
    return q_rows, q_rows + 2 * dims.head_dim


def _qkv_placement(dims: Dims, shape) -> list[list[Block]]:
    q_rows, group_rows = _qkv_rows(dims)
    d, groups = dims.head_dim, range(dims.num_query_groups)
    return [[(g * q_rows, g * group_rows, q_rows) for g in groups],
            [(g * d, g * group_rows + q_rows, d) for g in groups],
            [(g * d, g * group_rows + q_rows + d, d) for g in groups]]


def _qkv_to_hf(t: torch.Tensor, dims: Dims) -> list[torch.Tensor]:
    groups, rest = dims.num_query_groups, t.shape[1:]
    q_rows, _ = _qkv_rows(dims)
    q, k, v = t.reshape(groups, -1, *rest).split([q_rows, dims.head_dim, dims.head_dim], dim=1)
    return [x.reshape(-1, *rest) for x in (q, k, v)]


FUSED_QKV = Transform("fused_qkv", _qkv_placement, _qkv_to_hf)


# --- fused gate/up: linear_fc1 = [gate; up] (megatron's swiglu takes the first half as the gate) ---
FUSED_GATE_UP = Transform("fused_gate_up",
                          lambda dims, shape: [[(0, 0, shape[0] // 2)], [(0, shape[0] // 2, shape[0] // 2)]],
                          lambda t, dims: list(t.chunk(2, dim=0)))


# --- vocab padding: megatron pads the vocab (rows) with zeros to a multiple of 128 * TP ------------
def _strip_vocab(t: torch.Tensor, dims: Dims) -> list[torch.Tensor]:
    if t.shape[0] < dims.vocab_size:
        raise ValueError(f"has {t.shape[0]} vocab rows, fewer than vocab_size={dims.vocab_size}")
    return [t[: dims.vocab_size]]


PADDED_VOCAB = Transform("padded_vocab", lambda dims, shape: [[(0, 0, dims.vocab_size)]], _strip_vocab)
