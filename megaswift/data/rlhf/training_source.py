"""The `DataSource` of `megaswift rlhf`: preprocessed preference pairs as fixed-length training rows.

A row holds whole pairs (packing.py): one pair per row without --data.packing, as many as fit with it.
Either way chosen and rejected are separate attention segments of one row, so attention is always
segment-restricted: a block-diagonal causal mask ("mask", megatron-core's local attention) or THD
PackedSeqParams ("thd", Transformer Engine), as sft's packed rows.

A micro-batch carries what the forward step of megaswift/objectives/dpo.py consumes:
    tokens, labels (-100 replaced by 0; loss_mask carries the exclusion), loss_mask, loss_scale,
    position_ids, attention_mask | packed_seq_params,
    sequence_ids  per token: 2k chosen / 2k+1 rejected of the micro-batch's pair k, -1 padding
    num_pairs     pairs in the micro-batch
    pair_index    [num_pairs] the pairs' indices in their split (the key of precomputed reference log-probs)
Row order is a seeded permutation per epoch (as sft), so a resumed run sees the same rows.
"""
import os
import sys

import numpy
import torch

from megaswift.data.rlhf.packing import PairRowsDataset, collate_pairs
from megaswift.data.rlhf.preprocess import preprocess_pairs
from megaswift.data.sft.packing import packed_seq_params
from megaswift.data.sft.training_source import ChatDataSource, check_sample_token_ids
from megaswift.data.sft.template import IGNORE_INDEX

TOKEN_KEYS = ("tokens", "labels", "loss_mask", "loss_scale", "position_ids", "sequence_ids")


class PairTrainingRows(torch.utils.data.Dataset):
    """Endless rows of whole pairs: epoch after epoch, each through a fresh seeded permutation."""

    def __init__(self, rows: PairRowsDataset, seed: int):
        self.rows, self.seed, self.epoch_size = rows, seed, len(rows)
        if self.epoch_size == 0:
            raise ValueError("rlhf: no training rows left after preprocessing (all pairs dropped?)")

    def __len__(self) -> int:
        return 2 ** 62

    def __getitem__(self, index: int) -> dict:
        epoch, offset = divmod(index, self.epoch_size)
        order = numpy.random.default_rng([self.seed, epoch]).permutation(self.epoch_size)
        return self.rows[int(order[offset])]


def collate_pair_rows(rows: list[dict], packed_attention: str) -> dict:
    """Rows of pairs -> one micro-batch (see the module docstring); THD puts the rows end to end."""
    batch = collate_pairs(rows, with_attention_mask=packed_attention == "mask")
    labels = batch["labels"]
    out = {"tokens": batch["input_ids"], "labels": labels.masked_fill(labels == IGNORE_INDEX, 0),
           "loss_mask": (labels != IGNORE_INDEX).float(), "loss_scale": batch["loss_scale"],
           "position_ids": batch["position_ids"], "sequence_ids": batch["sequence_ids"],
           "num_pairs": batch["num_pairs"], "pair_index": batch["pair_index"]}
    if packed_attention == "thd":
        out.update({key: out[key].reshape(1, -1) for key in TOKEN_KEYS})
        out["packed_seq_params"] = packed_seq_params(batch["cu_seqlens"], batch["max_seqlen"])
    else:
        out["attention_mask"] = batch["attention_mask"]
    return out


class PairData(ChatDataSource):
    """Train / valid micro-batch iterators of preference pairs (preprocessing: data/rlhf/preprocess.py)."""

    def collate(self, samples: list[dict]) -> dict:
        return collate_pair_rows(samples, self.packed_attention)

    def split_rows(self) -> tuple[PairRowsDataset, PairRowsDataset | None]:
        """(train, valid) rows in dataset order, each row a whole number of pairs."""
        return self._rows()

    def _rows(self):
        if self._built is None:
            # Deterministic, so every rank encodes the same pairs (not cached yet: see preprocess.py).
            result = preprocess_pairs(self.data_settings(), self.tokenizer, self.data.num_proc)
            self.stats = result.stats
            if int(os.environ.get("RANK", "0")) == 0:
                print(describe_pair_stats(result.stats), file=sys.stderr, flush=True)
            if self.model_vocab_size is not None:  # labels hold the same ids (or -100): input ids suffice
                check_sample_token_ids(result.dataset, self.model_vocab_size, self.data.tokenizer, self.data.datasets,
                                       columns=("chosen_input_ids", "rejected_input_ids"), what="rlhf data")
            self._built = self.train_valid(result.dataset, lambda part, pad_id: PairRowsDataset(
                part, self.data.seq_length, pad_id, self.data.packing))
        return self._built

    def _splits(self):
        train, valid = self._rows()
        return PairTrainingRows(train, self.seed), (PairTrainingRows(valid, self.seed) if valid else None)


def describe_pair_stats(stats: dict) -> str:
    dropped = ", ".join(f"{k} {v}" for k, v in stats["dropped"].items() if v) or "none"
    line = (f"rlhf data: {stats['rows_kept']}/{stats['rows_in']} pairs kept (dropped: {dropped}; truncated "
            f"{stats['truncated']}), {stats['tokens']} tokens; {stats['seconds']} s")
    if stats.get("bad_row_examples"):
        line += "; skipped bad rows, e.g. " + "; ".join(stats["bad_row_examples"])
    return line
