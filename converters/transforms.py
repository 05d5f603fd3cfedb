"""Named tensor transforms between HF and megatron-core layouts, each with both directions.

`to_mcore(hf_tensors, dims, mcore_shape)` builds one megatron-core tensor from the HF tensors a rule
names; `to_hf(mcore_tensor, dims)` gives them back, in the same order. Both are pure reshapes, slices
and concatenations, so a round trip is bit-exact. The expected HF shapes are derived by running
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


@dataclass(frozen=True)
class Transform:
    name: str
    to_mcore: Callable[[list[torch.Tensor], Dims, tuple[int, ...]], torch.Tensor]
    to_hf: Callable[[torch.Tensor, Dims], list[torch.Tensor]]


def _same_dtype(tensors: list[torch.Tensor]) -> None:
    if len({t.dtype for t in tensors}) > 1:
        raise ValueError(f"tensors fused into one have different dtypes: {[t.dtype for t in tensors]}")


# --- identity: same tensor under another name ------------------------------------------------------
IDENTITY = Transform("identity", lambda hf, dims, shape: hf[0], lambda t, dims: [t])


# --- fused QKV --------------------------------------------------------------------------------------
# megatron-core's linear_qkv holds, for each query group g in turn: the group's q heads, its k head,
# its v head (rows of head_dim each). TP splits this tensor by whole groups, so the layout is TP-free:
#     [ q(g0 heads) | k(g0) | v(g0) | q(g1 heads) | k(g1) | v(g1) | ... ]
# HF keeps q_proj [heads*d], k_proj [groups*d], v_proj [groups*d] apart. Works for weights and biases.
def _qkv_to_mcore(hf: list[torch.Tensor], dims: Dims, shape) -> torch.Tensor:
    q, k, v = hf
    _same_dtype(hf)
    groups, rest = dims.num_query_groups, q.shape[1:]
    fused = torch.cat([q.reshape(groups, -1, *rest), k.reshape(groups, -1, *rest),
                       v.reshape(groups, -1, *rest)], dim=1)
    return fused.reshape(-1, *rest)


def _qkv_to_hf(t: torch.Tensor, dims: Dims) -> list[torch.Tensor]:
    groups, rest = dims.num_query_groups, t.shape[1:]
    q_rows = dims.num_heads // dims.num_query_groups * dims.head_dim
    q, k, v = t.reshape(groups, -1, *rest).split([q_rows, dims.head_dim, dims.head_dim], dim=1)
    return [x.reshape(-1, *rest) for x in (q, k, v)]


FUSED_QKV = Transform("fused_qkv", _qkv_to_mcore, _qkv_to_hf)


# --- fused gate/up: linear_fc1 = [gate; up] (megatron's swiglu takes the first half as the gate) ---
def _gate_up_to_mcore(hf: list[torch.Tensor], dims: Dims, shape) -> torch.Tensor:
    _same_dtype(hf)
    return torch.cat(hf, dim=0)


FUSED_GATE_UP = Transform("fused_gate_up", _gate_up_to_mcore, lambda t, dims: list(t.chunk(2, dim=0)))


# --- vocab padding: megatron pads the vocab (rows) with zeros to a multiple of 128 * TP ------------
def _pad_vocab(hf: list[torch.Tensor], dims: Dims, shape) -> torch.Tensor:
    (t,) = hf
    if shape[0] == t.shape[0]:
        return t
    padded = t.new_zeros((shape[0], *t.shape[1:]))
    padded[: t.shape[0]] = t
    return padded


def _strip_vocab(t: torch.Tensor, dims: Dims) -> list[torch.Tensor]:
    if t.shape[0] < dims.vocab_size:
        raise ValueError(f"has {t.shape[0]} vocab rows, fewer than vocab_size={dims.vocab_size}")
    return [t[: dims.vocab_size]]


PADDED_VOCAB = Transform("padded_vocab", _pad_vocab, _strip_vocab)
