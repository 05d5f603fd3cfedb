"""Batches for the training loop: packed rows (--packing) or padded rows, and their attention masks.

Packing puts whole samples into rows of `seq_length` tokens with first-fit-decreasing (a sample is
never split; megaswift.kernels does the bin packing). A packed row holds:
    input_ids, labels, loss_scale   the samples' rows concatenated (see template.py for the shift),
                                    then padding: pad id, label -100, weight 0
    position_ids                    restart at 0 at every sample (and for the padding)
    cu_seqlens                      int32 boundaries of every segment, starting at 0 and ending at
                                    seq_length: the samples, then the padding as one last segment
                                    (every token belongs to a segment; padding attends only to itself)
    num_samples                     real samples in the row (cu_seqlens has num_samples + 1 entries,
                                    or num_samples + 2 when the row is padded)

How attention stays inside a sample depends on the attention backend:
    local spec   a block-diagonal causal mask, bool with True = masked (not attended), as
                 megatron-core's local DotProductAttention applies them
                 (`attention_scores.masked_fill_(attention_mask, -10000.0)`), shape [batch, 1, seq, seq];
    TE spec      no mask: the micro-batch becomes one THD sequence of B*S tokens ([1, B*S] tensors,
                 as megatron-core's attention squeezes a batch dimension of 1 in THD format) with a
                 megatron-core PackedSeqParams(qkv_format="thd") whose cu_seqlens span all B*S tokens
                 (`collate_thd`, `to_packed_seq_params`).
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import torch

from megaswift.data.sft.template import IGNORE_INDEX
from megaswift.kernels import pack_first_fit_decreasing, packed_row_metadata


def plan_packing(lengths: Sequence[int], seq_length: int) -> list[list[int]]:
    """Bins of sample indices, each bin's total length <= seq_length."""
    too_long = next((i for i, n in enumerate(lengths) if n > seq_length), None)
    if too_long is not None:
        raise ValueError(f"packing: sample {too_long} has {lengths[too_long]} tokens, expected at most "
                         f"seq_length={seq_length}; preprocess with max_length <= seq_length")
    return pack_first_fit_decreasing(list(lengths), seq_length)


def block_diagonal_causal_mask(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """[1, 1, S, S] bool, True = masked: token i sees token j only if j <= i in the same segment."""
    positions = torch.arange(seq_length)
    segment = torch.searchsorted(cu_seqlens[1:].to(torch.int64), positions, right=True)
    visible = (segment[:, None] == segment[None, :]) & (positions[None, :] <= positions[:, None])
    return (~visible)[None, None]


def causal_mask(seq_length: int) -> torch.Tensor:
    """[1, 1, S, S] bool, True = masked: the plain causal mask."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool), diagonal=1)[None, None]


class PackedSFTDataset(torch.utils.data.Dataset):
    """Rows of packed samples over a preprocessed dataset (columns input_ids, labels, loss_scale, length)."""

    def __init__(self, dataset, seq_length: int, pad_token_id: int):
        self.dataset, self.seq_length, self.pad_token_id = dataset, seq_length, pad_token_id
        self.lengths = list(dataset["length"])
        self.bins = plan_packing(self.lengths, seq_length)

    def __len__(self) -> int:
        return len(self.bins)

    @property
    def fill_ratio(self) -> float:
        """Real tokens / all token slots of the packed rows."""
        return sum(self.lengths) / max(len(self.bins) * self.seq_length, 1)

    def __getitem__(self, index: int) -> dict:
        members = self.bins[index]
        rows = self.dataset[members]  # dict of columns, in `members` order
        lengths = [self.lengths[i] for i in members]
        pad = self.seq_length - sum(lengths)
        cu_seqlens, position_ids = packed_row_metadata(lengths + ([pad] if pad else []))
        return {
            "input_ids": torch.tensor(list(chain.from_iterable(rows["input_ids"])) + [self.pad_token_id] * pad),
            "labels": torch.tensor(list(chain.from_iterable(rows["labels"])) + [IGNORE_INDEX] * pad),
            "loss_scale": torch.tensor(list(chain.from_iterable(rows["loss_scale"])) + [0.0] * pad, dtype=torch.float32),
            "position_ids": position_ids,
            "cu_seqlens": cu_seqlens,
            "num_samples": len(members),
        }


def collate_packed(rows: list[dict], with_attention_mask: bool = False) -> dict:
    """Stack packed rows into [B, S] tensors; `cu_seqlens` spans the flattened B*S tokens (THD)."""
    seq_length = rows[0]["input_ids"].numel()
    batch = {key: torch.stack([r[key] for r in rows]) for key in ("input_ids", "labels", "loss_scale", "position_ids")}
    batch["loss_mask"] = (batch["labels"] != IGNORE_INDEX).float()
    batch["cu_seqlens"], batch["max_seqlen"] = merge_cu_seqlens([r["cu_seqlens"] for r in rows], seq_length)
    if with_attention_mask:
        batch["attention_mask"] = torch.cat([block_diagonal_causal_mask(r["cu_seqlens"], seq_length) for r in rows])
    return batch


def collate_padded(rows: list[dict], seq_length: int, pad_token_id: int, with_attention_mask: bool = False) -> dict:
    """Unpacked rows padded on the right to seq_length: labels -100 and weight 0 in the padding."""
    batch_size = len(rows)
    input_ids = torch.full((batch_size, seq_length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch_size, seq_length), IGNORE_INDEX, dtype=torch.long)
    loss_scale = torch.zeros((batch_size, seq_length), dtype=torch.float32)
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        if n > seq_length:
            raise ValueError(f"collate: row {b} has {n} tokens, expected at most seq_length={seq_length}; "
                             f"preprocess with max_length <= seq_length")
        input_ids[b, :n] = torch.as_tensor(row["input_ids"])
        labels[b, :n] = torch.as_tensor(row["labels"])
        loss_scale[b, :n] = torch.as_tensor(row["loss_scale"], dtype=torch.float32)
    batch = {"input_ids": input_ids, "labels": labels, "loss_scale": loss_scale,
             "loss_mask": (labels != IGNORE_INDEX).float(),
             "position_ids": torch.arange(seq_length).expand(batch_size, -1).clone()}
    if with_attention_mask:  # right padding: the causal mask already keeps real tokens off the padding
        batch["attention_mask"] = causal_mask(seq_length).expand(batch_size, -1, -1, -1).clone()
    return batch


def merge_cu_seqlens(row_cu_seqlens: Sequence[torch.Tensor], seq_length: int) -> tuple[torch.Tensor, int]:
    """(cu_seqlens, max_seqlen) of rows laid end to end as one sequence of len(rows) * seq_length tokens.

    Each row's cu_seqlens starts at 0 and ends at seq_length (its padding is its last segment), so the
    result is int32, starts at 0, ends at B*S and has one segment per sample and per padded tail.
    """
    starts = [cu[:-1].to(torch.int32) + b * seq_length for b, cu in enumerate(row_cu_seqlens)]
    cu = torch.cat(starts + [torch.tensor([len(row_cu_seqlens) * seq_length], dtype=torch.int32)])
    return cu, int((cu[1:] - cu[:-1]).max())


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int):
    """megatron-core PackedSeqParams for self-attention over THD tokens split at cu_seqlens.

    cu_seqlens stays int32 (TE's THD kernels require it; the forward step moves it to the GPU with
    the batch); max_seqlen is a Python int (megatron-core sizes the RoPE table with it). No
    cu_seqlens_*_padded: without context parallelism there is no padding inside a segment.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


def to_packed_seq_params(batch: dict):
    """megatron-core PackedSeqParams (THD) for a collate_packed batch."""
    return packed_seq_params(batch["cu_seqlens"], batch["max_seqlen"])


THD_TOKEN_KEYS = ("tokens", "labels", "loss_mask", "loss_scale", "position_ids")


def collate_thd(rows: list[dict]) -> dict:
    """A micro-batch of packed training rows (each with its own `cu_seqlens`) as one THD sequence:
    every per-token tensor [1, B*S] (rows end to end), `packed_seq_params` over all B*S tokens, and
    no attention mask."""
    seq_length = rows[0]["tokens"].numel()
    batch = {key: torch.cat([torch.as_tensor(r[key]) for r in rows])[None] for key in THD_TOKEN_KEYS}
    batch["packed_seq_params"] = packed_seq_params(*merge_cu_seqlens([r["cu_seqlens"] for r in rows], seq_length))
    return batch
