"""Packing never splits a sample, respects capacity, restarts positions; masks and collators are right."""
import random

import datasets
import pytest
import torch

from megaswift.data.sft.packing import (
    PackedSFTDataset,
    block_diagonal_causal_mask,
    collate_packed,
    collate_padded,
    plan_packing,
    to_packed_seq_params,
)
from megaswift.data.sft.template import IGNORE_INDEX

SEQ = 64
PAD = 0


def sample_rows(n, seed=0):
    """Rows whose tokens encode (sample, position), so every token can be traced back."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        length = min(SEQ, max(1, int(rng.paretovariate(1.2) * 6)))
        ids = [1000 * (i + 1) + k for k in range(length)]
        rows.append({"input_ids": ids, "labels": [t if k % 3 else IGNORE_INDEX for k, t in enumerate(ids)],
                     "loss_scale": [0.0 if k % 3 == 0 else 1.5 for k in range(length)], "length": length})
    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def packed():
    return PackedSFTDataset(sample_rows(300), SEQ, PAD)


def test_every_sample_is_in_exactly_one_row_whole_and_rows_fit(packed):
    members = sorted(i for b in packed.bins for i in b)
    assert members == list(range(len(packed.dataset)))
    for k in range(len(packed)):
        row, offset = packed[k], 0
        assert row["input_ids"].numel() == SEQ
        for i in packed.bins[k]:
            sample = packed.dataset[i]
            n = sample["length"]
            assert row["input_ids"][offset:offset + n].tolist() == sample["input_ids"]
            assert row["labels"][offset:offset + n].tolist() == sample["labels"]
            assert row["loss_scale"][offset:offset + n].tolist() == sample["loss_scale"]
            offset += n
        assert offset <= SEQ
        assert (row["input_ids"][offset:] == PAD).all() and (row["labels"][offset:] == IGNORE_INDEX).all()
        assert (row["loss_scale"][offset:] == 0).all()


def test_position_ids_restart_and_cu_seqlens_match_the_samples(packed):
    for k in range(len(packed)):
        row = packed[k]
        lengths = [packed.lengths[i] for i in packed.bins[k]]
        pad = SEQ - sum(lengths)
        segments = lengths + ([pad] if pad else [])
        expected_cu = [0]
        for n in segments:
            expected_cu.append(expected_cu[-1] + n)
        assert row["cu_seqlens"].tolist() == expected_cu and row["cu_seqlens"].dtype == torch.int32
        assert row["position_ids"].tolist() == [p for n in segments for p in range(n)]
        assert row["num_samples"] == len(lengths)


def test_first_fit_decreasing_fills_rows(packed):
    from tests.kernels.test_packing import first_fit_decreasing_by_scan
    # exactly the textbook first-fit-decreasing bins (an unsorted first fit, too, passes the checks below)
    assert packed.bins == first_fit_decreasing_by_scan(list(packed.lengths), SEQ)
    assert sum(packed.lengths) <= len(packed) * SEQ
    # no two rows could be merged: first fit leaves at most one row at most half full
    fills = sorted(sum(packed.lengths[i] for i in b) for b in packed.bins)
    assert len(fills) < 2 or fills[0] + fills[1] > SEQ
    assert packed.fill_ratio == sum(packed.lengths) / (len(packed) * SEQ)


def test_a_sample_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match=r"sample 1 has 70 tokens, expected at most seq_length=64"):
        plan_packing([10, 70], SEQ)


def test_block_diagonal_mask_matches_segments():
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    segment = [0, 0, 0, 1, 2, 2, 2, 2]
    mask = block_diagonal_causal_mask(cu, 8)[0, 0]
    for i in range(8):
        for j in range(8):
            assert mask[i, j].item() == (not (segment[i] == segment[j] and j <= i))


def test_packed_attention_with_megatron_mask_function_equals_attention_per_sample():
    from megatron.core.transformer.utils import attention_mask_func

    torch.manual_seed(0)
    lengths = [5, 2, 9]
    cu = torch.tensor([0, 5, 7, 16], dtype=torch.int32)
    q, k, v = (torch.randn(16, 8) for _ in range(3))
    scores = attention_mask_func((q @ k.T)[None, None].clone(), block_diagonal_causal_mask(cu, 16))
    packed_out = torch.softmax(scores, -1)[0, 0] @ v
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        alone = torch.softmax((q[s] @ k[s].T).masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf")), -1) @ v[s]
        torch.testing.assert_close(packed_out[s], alone)
        start += n


def test_collate_packed_builds_thd_boundaries_over_the_batch(packed):
    rows = [packed[0], packed[1]]
    batch = collate_packed(rows, with_attention_mask=True)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, SEQ)
    expected = rows[0]["cu_seqlens"].tolist()[:-1] + [SEQ + c for c in rows[1]["cu_seqlens"].tolist()]
    assert batch["cu_seqlens"].tolist() == expected
    assert batch["max_seqlen"] == max(b - a for a, b in zip(expected, expected[1:]))
    assert torch.equal(batch["attention_mask"][1, 0], block_diagonal_causal_mask(rows[1]["cu_seqlens"], SEQ)[0, 0])
    assert torch.equal(batch["loss_mask"], (batch["labels"] != IGNORE_INDEX).float())
    params = to_packed_seq_params(batch)
    assert params.qkv_format == "thd" and torch.equal(params.cu_seqlens_q, batch["cu_seqlens"])


def test_collate_padded_pads_with_ignored_labels_and_zero_weights():
    rows = [r for r in sample_rows(4)]
    batch = collate_padded(rows, SEQ, pad_token_id=PAD, with_attention_mask=True)
    for b, row in enumerate(rows):
        n = row["length"]
        assert batch["input_ids"][b, :n].tolist() == row["input_ids"]
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all() and (batch["loss_scale"][b, n:] == 0).all()
        assert (batch["input_ids"][b, n:] == PAD).all()
    assert batch["position_ids"][1].tolist() == list(range(SEQ))
    assert batch["attention_mask"][0, 0, 2].tolist() == [False] * 3 + [True] * (SEQ - 3)
    with pytest.raises(ValueError, match="row 0 has 5 tokens, expected at most seq_length=4"):
        collate_padded([{"input_ids": [1] * 5, "labels": [1] * 5, "loss_scale": [1.0] * 5}], 4, PAD)
