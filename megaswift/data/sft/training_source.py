"""The `DataSource` of `megaswift sft`: preprocessed chat rows as fixed-length training rows.

Each row is a dict the trainer's forward step consumes: tokens, labels (-100 replaced by 0, since
megatron-core's vocab-parallel cross entropy has no ignore index; loss_mask carries the exclusion),
loss_mask, loss_scale, position_ids. Packed rows keep attention inside each sample in one of two ways
(`packed_attention`, chosen by the trainer from the attention backend):
    "mask"  a block-diagonal causal attention mask per row (megatron-core's local attention);
    "thd"   the row's cu_seqlens; a micro-batch becomes one THD sequence with megatron-core
            PackedSeqParams and no mask (Transformer Engine attention), see packing.collate_thd.
Row order is a seeded permutation per epoch, so a resumed run sees the same rows as an uninterrupted one.
The dataset paths are checked when SFTData is made (before the model is built); the token ids of the
preprocessed samples are checked against the model's vocabulary before the first step.
"""
from pathlib import Path

import numpy
import torch
import torch.distributed as dist

from megaswift.config import ConfigError, SFTDataConfig
from megaswift.data.data_paths import check_sft_paths
from megaswift.data.micro_batches import SplitIterators, stack_rows
from megaswift.data.sft.packing import PackedSFTDataset, block_diagonal_causal_mask, collate_padded, collate_thd
from megaswift.data.sft.preprocess import SFTDataSettings, preprocess_sft
from megaswift.data.sft.template import IGNORE_INDEX

DEFAULT_CACHE = Path.home() / ".cache" / "megaswift" / "sft"
PACKED_ATTENTION = ("mask", "thd")


class TrainingRows(torch.utils.data.Dataset):
    """Fixed-length rows over the preprocessed samples, packed or padded; indices past one epoch wrap
    around through a fresh seeded permutation."""

    def __init__(self, samples, seq_length: int, pad_id: int, packing: bool, seed: int,
                 packed_attention: str = "mask"):
        if packed_attention not in PACKED_ATTENTION:
            raise ValueError(f"packed_attention: expected one of {PACKED_ATTENTION}, found {packed_attention!r}")
        self.seq_length, self.pad_id, self.packing, self.seed = seq_length, pad_id, packing, seed
        self.packed_attention = packed_attention
        self.rows = PackedSFTDataset(samples, seq_length, pad_id) if packing else samples
        self.epoch_size = len(self.rows)
        if self.epoch_size == 0:
            raise ValueError("sft: no training rows left after preprocessing (all samples dropped?)")

    def __len__(self) -> int:
        return 2 ** 62  # endless: MicroBatches asks for consecutive indices, epochs follow each other

    def _row(self, index: int) -> dict:
        epoch, offset = divmod(index, self.epoch_size)
        order = numpy.random.default_rng([self.seed, epoch]).permutation(self.epoch_size)
        return self.rows[int(order[offset])]

    def __getitem__(self, index: int) -> dict:
        row = self._row(index)
        if self.packing:
            batch = {"input_ids": row["input_ids"], "labels": row["labels"], "loss_scale": row["loss_scale"],
                     "position_ids": row["position_ids"]}
            if self.packed_attention == "thd":
                batch["cu_seqlens"] = row["cu_seqlens"]
            else:
                batch["attention_mask"] = block_diagonal_causal_mask(row["cu_seqlens"], self.seq_length)[0]
        else:
            padded = collate_padded([row], self.seq_length, self.pad_id)
            batch = {key: value[0] for key, value in padded.items()}
        labels = batch["labels"]
        return {"tokens": batch["input_ids"], "labels": labels.masked_fill(labels == IGNORE_INDEX, 0),
                "loss_mask": (labels != IGNORE_INDEX).float(), "loss_scale": batch["loss_scale"],
                "position_ids": batch["position_ids"],
                **{key: batch[key] for key in ("attention_mask", "cu_seqlens") if key in batch}}


class ChatDataSource(SplitIterators):
    """What sft's and rlhf's data sources share: chat datasets (paths checked up front), the tokenizer, and
    rows built once on first use (`_built`), with their preprocessing counts in `stats`."""

    def __init__(self, data: SFTDataConfig, tokenizer, seed: int, micro_batch_size: int,
                 packed_attention: str = "mask", model_vocab_size: int | None = None):
        check_sft_paths(data.datasets, data.loss_scale)
        self.data, self.tokenizer, self.seed, self.micro = data, tokenizer, seed, micro_batch_size
        self.packed_attention = packed_attention
        self.model_vocab_size = model_vocab_size
        self._built = None
        self.stats: dict = {}

    def data_settings(self) -> SFTDataSettings:
        """What decides the encoded samples (or pairs): the data section's preprocessing fields."""
        return SFTDataSettings(datasets=tuple(self.data.datasets), max_length=self.data.seq_length,
                               loss_on=self.data.loss_on, loss_scale=self.data.loss_scale,
                               over_length=self.data.over_length, skip_bad_rows=self.data.skip_bad_rows,
                               seed=self.seed)

    def train_valid(self, samples, make) -> tuple:
        """(train, valid or None): the first valid_fraction of the encoded samples is the validation split;
        `make(part, pad_id)` turns a part into rows."""
        n_valid = int(len(samples) * self.data.valid_fraction)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        train = make(samples.select(range(n_valid, len(samples))), pad_id)
        return train, (make(samples.select(range(n_valid)), pad_id) if n_valid else None)


class SFTData(ChatDataSource):
    def collate(self, samples: list[dict]) -> dict:
        return collate_thd(samples) if self.data.packing and self.packed_attention == "thd" else stack_rows(samples)

    def _preprocess(self):
        settings = self.data_settings()
        cache = self.data.cache_dir or DEFAULT_CACHE
        run = lambda report: preprocess_sft(settings, self.tokenizer, cache, self.data.num_proc, report=report)
        if not dist.is_initialized():
            return run(True)
        # Rank 0 preprocesses; then it tells the others whether that worked: on success they read its
        # cache instead of repeating the work, on failure they stop with a short message (rather than
        # a broken-connection error beside rank 0's own).
        if dist.get_rank() == 0:
            try:
                result = run(True)
            except Exception:
                _share_preprocessing_outcome(False)
                raise
            _share_preprocessing_outcome(True)
            return result
        if not _share_preprocessing_outcome(None):
            raise ValueError("sft data: preprocessing failed on rank 0 (its error is reported above); "
                             "this rank stops too")
        return run(False)

    def _splits(self):
        if self._built is None:
            result = self._preprocess()
            self.stats = result.stats
            samples = result.dataset
            if self.model_vocab_size is not None:
                check_sample_token_ids(samples, self.model_vocab_size, self.data.tokenizer, self.data.datasets)
            self._built = self.train_valid(samples, lambda part, pad_id: TrainingRows(
                part, self.data.seq_length, pad_id, self.data.packing, self.seed, self.packed_attention))
        return self._built


def check_sample_token_ids(samples, model_vocab_size: int, tokenizer_name, datasets: list[str],
                           columns: tuple[str, ...] = ("input_ids", "labels"), what: str = "sft data") -> None:
    """ConfigError when an encoded token id is at or past the model's vocabulary (it would fail at step 1
    inside the embedding); a max over the Arrow `columns` (lists of ids), no Python loop."""
    import pyarrow.compute as pc
    largest = max(pc.max(pc.list_flatten(samples.data.column(name))).as_py() or -1 for name in columns)
    if largest >= model_vocab_size:
        raise ConfigError(
            f"{what}: the tokenizer {tokenizer_name} gives token id {largest} (in {', '.join(datasets)}), but the "
            f"model's vocabulary has {model_vocab_size} ids (0..{model_vocab_size - 1}); training would fail at "
            f"step 1. Use the model's own tokenizer (--data.tokenizer), or a model with vocab_size > {largest}.")


def _share_preprocessing_outcome(ok: bool | None) -> bool:
    """Rank 0 passes whether its preprocessing worked, every other rank passes None; all get rank 0's
    answer. On failure all ranks also meet at a barrier, so rank 0 exits only after the others know."""
    outcome = [ok]
    dist.broadcast_object_list(outcome, src=0)
    if not outcome[0]:
        dist.barrier()
    return bool(outcome[0])
