"""Named tensor transforms between HF and megatron-core layouts: one row placement each, read both ways.

`to_mcore(hf_tensors, dims, mcore_shape)` builds one megatron-core tensor from the HF tensors a rule
names by placing their rows; `to_hf(mcore_tensor, dims)` gathers them back, in the same order. A
transform may also change values (`ValueMap`, e.g. a norm weight stored as `1 + w` on one side), as a
pair of exact inverses; the shared ones only move rows, so a round trip is bit-exact. The expected HF
shapes are derived by running `to_hf` on a meta tensor of the megatron-core shape, so no shape table
is kept twice.
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
class ValueMap:
    """Elementwise value change between the sides, applied to the whole placed megatron-core tensor
    (`to_mcore`) or to it before its rows are gathered (`to_hf`). The two must be exact inverses on
    the dtypes converted, or the round trip is no longer bit-exact."""
    to_mcore: Callable[[torch.Tensor], torch.Tensor]
    to_hf: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Transform:
    """`placement(dims, mcore_shape)` says, for each HF tensor in rule order, which of its rows
    (along dim 0) land where in the megatron-core tensor; rows no block covers are zeros (vocab
    padding). It is the one description of the layout, read both ways: `to_mcore` places rows,
    `to_hf` gathers them back, and hf2mcore reads each block from disk straight into its place."""
    name: str
    placement: Callable[[Dims, tuple[int, ...]], list[list[Block]]]
    values: ValueMap | None = None

    def finish_mcore(self, placed: torch.Tensor) -> torch.Tensor:
        """The megatron-core tensor from the placed HF rows: the value change, if any."""
        return self.values.to_mcore(placed) if self.values else placed

    def to_mcore(self, hf: list[torch.Tensor], dims: Dims, shape: tuple[int, ...]) -> torch.Tensor:
        placement = self.placement(dims, shape)
        if len(hf) == 1 and tuple(hf[0].shape) == tuple(shape) and placement == [[(0, 0, shape[0])]]:
            return self.finish_mcore(hf[0])  # nothing moves: no copy
        if len({t.dtype for t in hf}) > 1:
            raise ValueError(f"tensors fused into one have different dtypes: {[t.dtype for t in hf]}")
        out = empty_placed(shape, hf[0].dtype, placement)
        for tensor, blocks in zip(hf, placement):
            for src, dst, rows in blocks:
                out[dst:dst + rows] = tensor[src:src + rows]
        return self.finish_mcore(out)

    def to_hf(self, t: torch.Tensor, dims: Dims) -> list[torch.Tensor]:
        """The HF tensors, in rule order: views of `t` where a tensor is one block, else copies."""
        placement = self.placement(dims, tuple(t.shape))
        needed = max((dst + rows for blocks in placement for _, dst, rows in blocks), default=0)
        if t.shape[0] < needed:
            raise ValueError(f"has {t.shape[0]} rows, expected at least {needed} ({self.name}: vocab_size="
                             f"{dims.vocab_size}, {dims.num_heads} heads, {dims.num_query_groups} query groups)")
        if self.values:
            t = self.values.to_hf(t)
        parts = []
        for blocks in placement:
            pieces = [t[dst:dst + rows] for _, dst, rows in sorted(blocks)]
            parts.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces))
        return parts


def empty_placed(shape: tuple[int, ...], dtype: torch.dtype, placement: list[list[Block]],
                 empty=torch.empty) -> torch.Tensor:
    """An uninitialised tensor for `placement` to fill, with the rows it leaves uncovered zeroed. `empty`:
    where its memory comes from (hf2mcore passes a reused buffer's)."""
    out = empty(shape, dtype=dtype)
    covered = sorted((dst, dst + rows) for blocks in placement for _, dst, rows in blocks)
    row = 0
    for start, end in covered + [(shape[0], shape[0])]:
        if start > row:
            out[row:start].zero_()
        row = max(row, end)
    return out


# --- identity: same tensor under another name ------------------------------------------------------
IDENTITY = Transform("identity", lambda dims, shape: [[(0, 0, shape[0])]])


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


FUSED_QKV = Transform("fused_qkv", _qkv_placement)


# --- fused gate/up: linear_fc1 = [gate; up] (megatron's swiglu takes the first half as the gate) ---
FUSED_GATE_UP = Transform("fused_gate_up",
                          lambda dims, shape: [[(0, 0, shape[0] // 2)], [(0, shape[0] // 2, shape[0] // 2)]])


# --- vocab padding: megatron pads the vocab (rows) with zeros to a multiple of 128 * TP ------------
PADDED_VOCAB = Transform("padded_vocab", lambda dims, shape: [[(0, 0, dims.vocab_size)]])
