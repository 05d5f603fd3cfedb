"""Supervised fine-tuning data: raw chat / agent datasets -> rows the training loop consumes.

Pipeline (one module per stage):
    sources.py     load_source("data.jsonl#1000", seed) -> raw rows (jsonl/json/csv/parquet, a
                   save_to_disk folder, or a hub name); mix_sources(parts, seed)
    formats.py     detect_format(row, where); normalise_row(row, format, where) -> the standard
                   {"messages": [...], "tools": [...] | None, "rejected_response": str | None}
                   (OpenAI messages, ms-swift query/response/history, alpaca, sharegpt)
    template.py    SFTTemplate(tokenizer, loss_on, max_length, over_length, loss_scale).encode(sample)
                   -> input_ids, labels (labels[i] = target of position i, -100 = not trained), loss_scale
    loss_scale.py  load_loss_scale("default" | "agent" | "my.json") -> per-character weight rules
    preprocess.py  preprocess_sft(SFTDataSettings(...), tokenizer, cache_dir, num_proc) -> dataset + stats
    packing.py     PackedSFTDataset(dataset, seq_length, pad_id) + collate_packed, or collate_padded;
                   block_diagonal_causal_mask (local attention), collate_thd / to_packed_seq_params
                   (Transformer Engine: megatron-core PackedSeqParams, THD)
    training_source.py  SFTData: the trainer's data source (training rows, micro-batches)

What the training loop does with a batch (from collate_packed or collate_padded):
    logits for input_ids [B, S] (position_ids; attention_mask when packed for local attention), or
    for Transformer Engine one packed THD sequence [1, B*S] with PackedSeqParams;
    per-token cross entropy against labels, where labels == -100 replaced by any valid id (megatron's
    vocab-parallel cross entropy does not ignore -100), times loss_scale (0 wherever labels is -100),
    summed and divided by loss_mask.sum() (the number of trained tokens).
"""
from megaswift.data.sft.formats import SampleFormatError, detect_format, normalise_row
from megaswift.data.sft.loss_scale import LossScaleConfig, load_loss_scale
from megaswift.data.sft.packing import (
    PackedSFTDataset,
    block_diagonal_causal_mask,
    collate_packed,
    collate_padded,
    collate_thd,
    to_packed_seq_params,
)
from megaswift.data.sft.preprocess import PreprocessedSFT, SFTDataSettings, preprocess_sft
from megaswift.data.sft.sources import load_source, mix_sources
from megaswift.data.sft.template import IGNORE_INDEX, SFTTemplate

__all__ = [
    "IGNORE_INDEX", "LossScaleConfig", "PackedSFTDataset", "PreprocessedSFT", "SFTDataSettings",
    "SFTTemplate", "SampleFormatError", "block_diagonal_causal_mask", "collate_packed", "collate_padded",
    "collate_thd", "detect_format", "load_loss_scale", "load_source", "mix_sources", "normalise_row",
    "preprocess_sft", "to_packed_seq_params",
]
