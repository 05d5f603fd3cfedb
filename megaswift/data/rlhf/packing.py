"""Training rows of whole pairs: chosen and rejected of a pair always travel in the same row.

A row holds one pair (packing off) or as many whole pairs as first-fit-decreasing puts into
`seq_length` tokens (packing on; sft's planner, on pair lengths). Inside a row every sequence is its
own segment, in the order chosen_0, rejected_0, chosen_1, rejected_1, ..., then the padding as one
last segment: positions restart per segment and attention never crosses segments (the same
cu_seqlens / block-diagonal mask as sft packing, megaswift/data/sft/packing.py), so packed and
unpacked rows give every sequence the same log-probabilities.

Row keys: input_ids, labels, loss_scale, position_ids, cu_seqlens (as sft), plus
    sequence_ids   per token: 2k for the chosen of the row's pair k, 2k+1 for its rejected, -1 padding
    num_pairs
    pair_index     [num_pairs] each pair's index in the encoded dataset (the key of precomputed
                   reference log-probs), in sequence-id order
`collate_pairs` stacks rows (sft's collate_packed) and renumbers sequence_ids across the micro-batch,
which is what megaswift.objectives.sequence_logps consumes.
"""
from __future__ import annotations

from itertools import chain

import torch

from megaswift.data.sft.packing import collate_packed, plan_packing
from megaswift.data.sft.template import IGNORE_INDEX
from megaswift.kernels import packed_row_metadata

SIDES = ("chosen", "rejected")


class PairRowsDataset(torch.utils.data.Dataset):
    """Rows of whole pairs over an encoded preference dataset (columns chosen_* / rejected_*, length)."""

    def __init__(self, dataset, seq_length: int, pad_token_id: int, packing: bool = True):
        self.dataset, self.seq_length, self.pad_token_id = dataset, seq_length, pad_token_id
        self.lengths = list(dataset["length"])
        # plan_packing also refuses a pair longer than seq_length (preprocess with max_length <= seq_length)
        bins = plan_packing(self.lengths, seq_length)
        self.bins = bins if packing else [[i] for i in range(len(self.lengths))]

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> dict:
        members = self.bins[index]
        rows = self.dataset[members]
        sequences = [(side, i) for i in range(len(members)) for side in SIDES]
        lengths = [len(rows[f"{side}_input_ids"][i]) for side, i in sequences]
        pad = self.seq_length - sum(lengths)
        cu_seqlens, position_ids = packed_row_metadata(lengths + ([pad] if pad else []))

        def joined(column: str, fill) -> list:
            return list(chain.from_iterable(rows[f"{side}_{column}"][i] for side, i in sequences)) + [fill] * pad

        sequence_ids = list(chain.from_iterable([2 * i + SIDES.index(side)] * n
                                                for (side, i), n in zip(sequences, lengths))) + [-1] * pad
        return {
            "input_ids": torch.tensor(joined("input_ids", self.pad_token_id)),
            "labels": torch.tensor(joined("labels", IGNORE_INDEX)),
            "loss_scale": torch.tensor(joined("loss_scale", 0.0), dtype=torch.float32),
            "position_ids": position_ids,
            "cu_seqlens": cu_seqlens,
            "sequence_ids": torch.tensor(sequence_ids),
            "num_pairs": len(members),
            "pair_index": torch.tensor(members, dtype=torch.long),
        }


def collate_pairs(rows: list[dict], with_attention_mask: bool = False) -> dict:
    """[B, S] tensors as sft's collate_packed, plus sequence_ids numbered across the micro-batch and
    num_pairs (the micro-batch's total)."""
    batch = collate_packed(rows, with_attention_mask)
    offsets = torch.tensor([0] + [r["num_pairs"] for r in rows[:-1]]).cumsum(0)
    ids = torch.stack([r["sequence_ids"] for r in rows])
    batch["sequence_ids"] = torch.where(ids >= 0, ids + 2 * offsets[:, None], ids)
    batch["num_pairs"] = sum(r["num_pairs"] for r in rows)
    batch["pair_index"] = torch.cat([r["pair_index"] for r in rows])
    return batch
