"""The micro-batches `megaswift sft` feeds the model: packed rows as THD (Transformer Engine) carry
megatron-core PackedSeqParams that cut exactly where the local path's block-diagonal mask cuts."""
import json

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megaswift.config import SFTDataConfig
from megaswift.data.sft.packing import block_diagonal_causal_mask
from megaswift.data.sft.training_source import SFTData, TrainingRows

SEQ = 64
MICRO = 3
TOKEN_KEYS = ("tokens", "labels", "loss_mask", "loss_scale", "position_ids")


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft_rows") / "chat.jsonl"
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    rows = [{"instruction": f"Say {i} words.", "input": "",
             "output": " ".join(words[(i + k) % len(words)] for k in range(1 + (i * 7) % 13))} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _source(chat_file, tokenizer, tmp_path, packed_attention, packing=True):
    data = SFTDataConfig(datasets=[str(chat_file)], seq_length=SEQ, packing=packing, cache_dir=str(tmp_path))
    return SFTData(data, tokenizer, seed=3, micro_batch_size=MICRO, packed_attention=packed_attention)


def _first(source, stages=1):
    return [next(it) for it in source.train_iterators(consumed_samples=0, dp_rank=0, dp_size=1, count=stages)]


def test_thd_micro_batch_carries_packed_seq_params_matching_the_packing(chat_file, tokenizer, tmp_path):
    source = _source(chat_file, tokenizer, tmp_path, "thd")
    batch = _first(source)[0]
    rows: TrainingRows = source._splits()[0]
    assert rows.epoch_size < 24, "samples must share rows for this test to mean anything"

    assert "attention_mask" not in batch
    for key in TOKEN_KEYS:
        assert batch[key].shape == (1, MICRO * SEQ), key
    params = batch["packed_seq_params"]
    assert isinstance(params, PackedSeqParams) and params.qkv_format == "thd"
    cu = params.cu_seqlens_q
    assert torch.equal(params.cu_seqlens_kv, cu) and cu.dtype == torch.int32 and cu.dim() == 1
    assert params.cu_seqlens_q_padded is None and params.cu_seqlens_kv_padded is None

    # The segments are this micro-batch's packed rows end to end: each row's samples, then its padding.
    expected, samples, padded = [0], 0, 0
    for row in (rows._row(i) for i in range(MICRO)):
        lengths = [rows.rows.lengths[i] for i in rows.rows.bins[_bin_of(rows, row)]]
        pad = SEQ - sum(lengths)
        for n in lengths + ([pad] if pad else []):
            expected.append(expected[-1] + n)
        samples, padded = samples + len(lengths), padded + bool(pad)
    assert cu.tolist() == expected and expected[-1] == MICRO * SEQ
    assert len(cu) - 1 == samples + padded and samples > MICRO
    widths = [b - a for a, b in zip(expected, expected[1:])]
    assert all(w > 0 for w in widths)
    assert type(params.max_seqlen_q) is int and params.max_seqlen_q == params.max_seqlen_kv == max(widths)
    # position ids restart exactly at the segment starts
    assert (batch["position_ids"][0] == 0).nonzero().flatten().tolist() == expected[:-1]


def _bin_of(rows, packed_row):
    """Index of the packing bin a packed row was built from (its tokens identify it)."""
    for k in range(len(rows.rows)):
        if torch.equal(rows.rows[k]["input_ids"], packed_row["input_ids"]):
            return k
    raise AssertionError("row not found")


def test_thd_and_mask_batches_hold_the_same_tokens_and_the_same_attention(chat_file, tokenizer, tmp_path):
    thd = _first(_source(chat_file, tokenizer, tmp_path, "thd"))[0]
    mask = _first(_source(chat_file, tokenizer, tmp_path, "mask"))[0]

    assert "packed_seq_params" not in mask and "cu_seqlens" not in mask
    assert mask["attention_mask"].shape == (MICRO, 1, SEQ, SEQ) and mask["attention_mask"].dtype == torch.bool
    for key in TOKEN_KEYS:
        assert mask[key].shape == (MICRO, SEQ)
        assert torch.equal(thd[key], mask[key].reshape(1, -1)), key
    # THD attention (causal within each cu_seqlens segment of the flat sequence) is the local path's
    # per-row block-diagonal mask, with rows never seeing each other.
    thd_visible = ~block_diagonal_causal_mask(thd["packed_seq_params"].cu_seqlens_q, MICRO * SEQ)[0, 0]
    mask_visible = torch.block_diag(*[~mask["attention_mask"][b, 0] for b in range(MICRO)])
    assert torch.equal(thd_visible, mask_visible)
    assert mask_visible.sum() < MICRO * SEQ * (SEQ + 1) // 2, "the rows must hold several samples"


def test_every_pipeline_stage_builds_the_same_thd_micro_batches(chat_file, tokenizer, tmp_path):
    source = _source(chat_file, tokenizer, tmp_path, "thd")
    iterators = source.train_iterators(consumed_samples=0, dp_rank=0, dp_size=1, count=2)
    for _ in range(3):
        first, second = (next(it) for it in iterators)
        for key in TOKEN_KEYS:
            assert torch.equal(first[key], second[key])
        assert torch.equal(first["packed_seq_params"].cu_seqlens_q, second["packed_seq_params"].cu_seqlens_q)
        assert first["packed_seq_params"].max_seqlen_q == second["packed_seq_params"].max_seqlen_q


def test_unpacked_rows_carry_neither_mask_nor_packed_seq_params(chat_file, tokenizer, tmp_path):
    batch = _first(_source(chat_file, tokenizer, tmp_path, "thd", packing=False))[0]
    assert "packed_seq_params" not in batch and "attention_mask" not in batch
    assert batch["tokens"].shape == (MICRO, SEQ)


def test_unknown_packed_attention_is_refused(chat_file, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"packed_attention: expected one of \('mask', 'thd'\), found 'bshd'"):
        _source(chat_file, tokenizer, tmp_path, "bshd")._splits()
