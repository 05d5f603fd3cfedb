"""The fused layouts, checked against megatron-core's documented order with labelled rows, the inverse
of every transform (pure row moves: bit-exact), and the disk path that reads rows into place."""
import pytest
import torch
from safetensors.torch import save_file

from converters.hf_reader import HfCheckpointReader
from megaswift.models.families.transforms import FUSED_GATE_UP, FUSED_QKV, IDENTITY, PADDED_VOCAB, Dims, empty_placed

DIMS = Dims(num_heads=6, num_query_groups=2, head_dim=3, vocab_size=10)


def labelled(rows: int, label: float, cols: int = 4) -> torch.Tensor:
    """Row r holds label + r, so each row's origin can be read back."""
    return (label + torch.arange(rows, dtype=torch.float32)).unsqueeze(1).repeat(1, cols)


def test_fused_qkv_orders_rows_per_query_group():
    q, k, v = labelled(18, 100), labelled(6, 200), labelled(6, 300)
    fused = FUSED_QKV.to_mcore([q, k, v], DIMS, (30, 4))
    expected_order = torch.cat([q[:9], k[:3], v[:3], q[9:], k[3:], v[3:]])
    assert torch.equal(fused, expected_order)
    # Read back the way megatron-core's SelfAttention.get_query_key_value_tensors does: a view per query
    # group of (heads per group + 2) x head_dim rows, split into that group's q, k and v.
    heads_per_group = DIMS.num_heads // DIMS.num_query_groups
    groups = fused.view(DIMS.num_query_groups, (heads_per_group + 2) * DIMS.head_dim, 4)
    q_back, k_back, v_back = torch.split(groups, [heads_per_group * DIMS.head_dim, DIMS.head_dim, DIMS.head_dim], 1)
    assert torch.equal(q_back.reshape(-1, 4), q) and torch.equal(k_back.reshape(-1, 4), k)
    assert torch.equal(v_back.reshape(-1, 4), v)
    assert all(torch.equal(a, b) for a, b in zip(FUSED_QKV.to_hf(fused, DIMS), (q, k, v)))


def test_fused_qkv_bias_round_trip():
    q, k, v = torch.randn(18), torch.randn(6), torch.randn(6)
    fused = FUSED_QKV.to_mcore([q, k, v], DIMS, (30,))
    assert torch.equal(fused[9:12], k[:3]) and torch.equal(fused[27:30], v[3:])
    assert all(torch.equal(a, b) for a, b in zip(FUSED_QKV.to_hf(fused, DIMS), (q, k, v)))


def test_fused_gate_up_puts_gate_first():
    gate, up = labelled(5, 0), labelled(5, 50)
    fused = FUSED_GATE_UP.to_mcore([gate, up], DIMS, (10, 4))
    assert torch.equal(fused[:5], gate) and torch.equal(fused[5:], up)
    assert all(torch.equal(a, b) for a, b in zip(FUSED_GATE_UP.to_hf(fused, DIMS), (gate, up)))


def test_vocab_padding_rows_are_zero_and_stripped_back():
    embedding = torch.randn(10, 4, dtype=torch.bfloat16)
    padded = PADDED_VOCAB.to_mcore([embedding], DIMS, (128, 4))
    assert padded.shape == (128, 4) and padded.dtype == torch.bfloat16
    assert torch.equal(padded[:10], embedding) and not padded[10:].any()
    (back,) = PADDED_VOCAB.to_hf(padded, DIMS)
    assert torch.equal(back, embedding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reading_rows_from_disk_into_place_equals_assembling_in_memory(tmp_path, dtype):
    """hf2mcore reads each HF tensor's rows straight into the fused tensor; that must give exactly what
    to_mcore gives in memory, padding rows zero even over dirty memory."""
    tensors = {"q": torch.randn(18, 4), "k": torch.randn(6, 4), "v": torch.randn(6, 4), "q_bias": torch.randn(18),
               "k_bias": torch.randn(6), "v_bias": torch.randn(6), "gate": torch.randn(5, 4), "up": torch.randn(5, 4),
               "embedding": torch.randn(10, 4)}
    tensors = {k: t.to(dtype) for k, t in tensors.items()}
    save_file(tensors, tmp_path / "model.safetensors")
    reader = HfCheckpointReader(tmp_path)
    cases = [(FUSED_QKV, ["q", "k", "v"], (30, 4)), (FUSED_QKV, ["q_bias", "k_bias", "v_bias"], (30,)),
             (FUSED_GATE_UP, ["gate", "up"], (10, 4)), (PADDED_VOCAB, ["embedding"], (128, 4)),
             (IDENTITY, ["gate"], (5, 4))]
    for transform, keys, shape in cases:
        placement = transform.placement(DIMS, shape)
        torch.full(shape, float("nan"), dtype=dtype)  # leave dirty memory about for empty() to reuse
        from_disk = empty_placed(shape, dtype, placement)
        for key, blocks in zip(keys, placement):
            reader.read_rows_into(key, blocks, from_disk)
        in_memory = transform.to_mcore([tensors[k] for k in keys], DIMS, shape)
        assert torch.equal(from_disk, in_memory), transform.name


def test_gathering_back_from_too_few_rows_is_an_error():
    with pytest.raises(ValueError, match="has 5 rows, expected at least 10"):
        PADDED_VOCAB.to_hf(torch.zeros(5, 4), DIMS)
