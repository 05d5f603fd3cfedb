"""The torch layer spec (megaswift/models/torch_attention.py) against megatron-core's local attention.

megatron-core's DotProductAttention is the reference: the same weights must give the same losses and
gradients (fp32, 1e-5) with the torch spec, unpacked and packed, at TP=2 and PP=2 (one 2-process launch
for both), and packed rows must equal the same samples one per row. FlexAttention has no CPU backward in
torch, so its path is checked forward-only here (and with gradients by the GPU case, where one is lent).
"""
import json

import pytest
import torch

from megaswift.config import ConfigError, ParallelConfig
from megaswift.config.validate import validate_choices
from megaswift.models import hf_to_transformer_config, preset_hf_config
from tests.torchrun import REPO, run_torchrun

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def single_process():
    from megaswift.train.distributed import init_distributed, shutdown_distributed
    init_distributed(ParallelConfig(), seed=3)
    yield
    shutdown_distributed()


# --- the core attention alone ------------------------------------------------------------------------
def attention_config(**fields):
    from megatron.core.transformer import TransformerConfig
    fields = {"attention_dropout": 0.0, **fields}
    return TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                             kv_channels=16, hidden_dropout=0.0, use_cpu_initialization=True, **fields)


def core_attentions(config):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megaswift.models.torch_attention import TorchDotProductAttention
    args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return DotProductAttention(**args), TorchDotProductAttention(**args)


def qkv(seq: int, batch: int, seed: int = 0, grad: bool = False):
    """query [s, b, 4 heads, 16], key/value [s, b, 2 groups, 16] (grouped-query attention)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(seq, batch, 4, 16), (seq, batch, 2, 16), (seq, batch, 2, 16)]
    return [(2 * torch.randn(*s, generator=g)).requires_grad_(grad) for s in shapes]


def packed_mask(row_cu_seqlens: list[list[int]], seq: int) -> torch.Tensor:
    from megaswift.data.sft.packing import block_diagonal_causal_mask
    return torch.cat([block_diagonal_causal_mask(torch.tensor(cu), seq) for cu in row_cu_seqlens])


def relative_difference(found: torch.Tensor, expected: torch.Tensor) -> float:
    return float((found - expected).norm() / expected.norm())


def outputs_and_grads(module, tensors, mask):
    out = module(*tensors, mask)
    out.backward(torch.ones_like(out))
    grads = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "block_diagonal"])
def test_sdpa_core_attention_equals_local_attention(single_process, packed):
    local, torch_attention = core_attentions(attention_config())
    tensors = qkv(48, 2, grad=True)
    mask = packed_mask([[0, 7, 30, 48], [0, 48]], 48) if packed else None
    expected, expected_grads = outputs_and_grads(local, tensors, mask)
    found, found_grads = outputs_and_grads(torch_attention, tensors, mask)
    assert found.shape == expected.shape == (48, 2, 64)
    torch.testing.assert_close(found, expected, rtol=TOLERANCE, atol=TOLERANCE)
    for a, b in zip(found_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=TOLERANCE, atol=TOLERANCE)


def test_flex_attention_with_a_document_mask_equals_local_attention(single_process, monkeypatch):
    """FlexAttention forward on CPU (the path a GPU takes): the block-diagonal mask read block by block and
    THD document ids from cu_seqlens both give the local attention's output; blocks between samples are
    skipped, not computed and masked."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megaswift.models import torch_attention as ta
    seq = 384  # three 128-token blocks; samples straddle block edges
    rows = [[0, 100, 300, 384], [0, 200, 384]]
    local, torch_attention = core_attentions(attention_config())
    monkeypatch.setattr(ta, "use_flex_attention", lambda q, dropout: True)
    query, key, value = qkv(seq, 2, seed=1)
    with torch.no_grad():
        expected = local(query, key, value, packed_mask(rows, seq))
        found = torch_attention(query, key, value, packed_mask(rows, seq))
        # THD: the two rows end to end as one sequence of 768 tokens, segments from cu_seqlens.
        cu = torch.tensor([0, 100, 300, 384, 584, 768], dtype=torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=200,
                                 max_seqlen_kv=200)
        thd = lambda x: x.transpose(0, 1).reshape(2 * seq, *x.shape[2:])
        found_thd = torch_attention(thd(query), thd(key), thd(value), None, packed_seq_params=params)
    torch.testing.assert_close(found, expected, rtol=TOLERANCE, atol=TOLERANCE)
    torch.testing.assert_close(found_thd, expected.transpose(0, 1).reshape(2 * seq, 64), rtol=TOLERANCE,
                               atol=TOLERANCE)
    block_mask = ta.document_block_mask(cu, 2 * seq)
    assert block_mask.sparsity() > 50  # most of the 6 x 6 blocks are skipped: other samples, or the future


def test_a_block_mask_is_built_once_per_mask_tensor():
    from megaswift.models.torch_attention import BlockMaskCache
    cache, builds = BlockMaskCache(), []
    build = lambda: builds.append(1) or len(builds)
    mask = torch.zeros(4, dtype=torch.bool)
    assert [cache.get(mask, build), cache.get(mask, build)] == [1, 1]
    mask[0] = True  # changed in place: a new block mask
    assert cache.get(mask, build) == 2
    assert cache.get(mask.clone(), build) == 3  # equal contents, another tensor: not trusted to be the same


def test_attention_dropout_acts_in_training_only(single_process):
    local, torch_attention = core_attentions(attention_config(attention_dropout=0.5))
    tensors = qkv(16, 1)
    with torch.no_grad():
        first, second = torch_attention(*tensors, None), torch_attention(*tensors, None)
        torch_attention.eval(), local.eval()
        evaluated, reference = torch_attention(*tensors, None), local(*tensors, None)
    assert not torch.equal(first, second)
    torch.testing.assert_close(evaluated, reference, rtol=TOLERANCE, atol=TOLERANCE)


# --- whole models: every kind of family ----------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3-moe"])
def test_torch_spec_model_trains_like_the_local_spec(single_process, preset):
    """Per-token losses and every gradient of a 2-layer model (GQA; MoE with qk-norm), unpacked and with
    two samples packed in a row; the same packed rows as one THD sequence give the same losses."""
    from megaswift.data.sft.packing import packed_seq_params
    from megaswift.models.builder import build_model_chunks
    hf = {**preset_hf_config(preset), "num_hidden_layers": 2}
    config = hf_to_transformer_config(hf, ParallelConfig(), init_std=0.2)
    (local,) = build_model_chunks(hf, config, "local")
    (torch_spec,) = build_model_chunks(hf, config, "torch")
    assert type(torch_spec.decoder.layers[0].self_attention.core_attention).__name__ == "TorchDotProductAttention"
    torch_spec.load_state_dict(local.state_dict())
    tokens = torch.randint(0, hf["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(32).expand(2, -1)
    packed_positions = torch.stack([torch.cat([torch.arange(12), torch.arange(20)]), torch.arange(32)])
    mask = packed_mask([[0, 12, 32], [0, 32]], 32)

    def run(model, *inputs, **kwargs):
        model.zero_grad(set_to_none=True)
        losses = model(*inputs, labels=inputs[0], **kwargs)
        losses.mean().backward()
        return losses.detach().reshape(-1), {n: p.grad.clone() for n, p in model.named_parameters()}

    for inputs in ((tokens, positions, None), (tokens, packed_positions, mask)):
        (expected, expected_grads), (found, found_grads) = run(local, *inputs), run(torch_spec, *inputs)
        torch.testing.assert_close(found, expected, rtol=TOLERANCE, atol=TOLERANCE)
        for name, grad in expected_grads.items():
            assert relative_difference(found_grads[name], grad) < TOLERANCE, name
    cu = torch.tensor([0, 12, 32, 64], dtype=torch.int32)
    thd, _ = run(torch_spec, tokens.reshape(1, -1), packed_positions.reshape(1, -1), None,
                 packed_seq_params=packed_seq_params(cu, 32))
    torch.testing.assert_close(thd, expected, rtol=TOLERANCE, atol=TOLERANCE)


def test_torch_and_local_specs_agree_at_tp2_and_pp2(tmp_path):
    """One 2-process launch (tests/models/torch_attention_worker.py): TP=2, then PP=2 (1F1B over several
    micro-batches), each with megatron-core's schedule and megaswift's SFT rows."""
    run_torchrun([REPO / "tests/models/torch_attention_worker.py", "--out", tmp_path], nproc=2, timeout=300,
                 cwd=REPO)
    for layout in ("tp2", "pp2"):
        ranks = [json.loads((tmp_path / f"{layout}-rank{r}.json").read_text()) for r in range(2)]
        for rank, result in enumerate(ranks):
            assert result["attention_class"] == "TorchDotProductAttention"
            diff = result["grad_rel_diff"]
            where = f"{layout} rank {rank}: {diff}"
            assert diff["torch_vs_local_plain"] < TOLERANCE, where
            assert diff["torch_vs_local_packed"] < TOLERANCE, where
            assert diff["torch_packed_vs_plain"] < TOLERANCE, where  # packed = one sample per row
            assert diff["torch_control_vs_plain"] > 0.1, where  # a leak across samples would show
        losses = ranks[1]["losses"]  # the last pipeline stage (TP: both ranks have them)
        assert losses["torch_plain"] == pytest.approx(losses["local_plain"], rel=TOLERANCE)
        assert losses["torch_packed"] == pytest.approx(losses["local_packed"], rel=TOLERANCE)
        assert losses["torch_packed"] == pytest.approx(losses["torch_plain"], rel=TOLERANCE)
        assert losses["torch_control"] != pytest.approx(losses["torch_plain"], rel=1e-4)


# --- choosing the spec ---------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="what auto picks without a GPU")
def test_auto_picks_the_local_spec_on_cpu():
    from megaswift.models.builder import resolve_layer_spec, use_transformer_engine
    assert resolve_layer_spec("auto") == "local"
    assert [resolve_layer_spec(c) for c in ("te", "torch", "local")] == ["te", "torch", "local"]
    assert not use_transformer_engine("torch")


def test_layer_spec_choices():
    from megaswift.models.builder import resolve_layer_spec
    validate_choices({"model.layer_spec": "torch"})
    with pytest.raises(ConfigError, match=r"model.layer_spec='flash' is not allowed; choose one of "
                                          r"\['auto', 'te', 'torch', 'local'\]"):
        validate_choices({"model.layer_spec": "flash"})
    with pytest.raises(ValueError, match="model.layer_spec='flash' is not allowed"):
        resolve_layer_spec("flash")


def test_the_spec_replaces_every_layers_core_attention_and_refuses_what_it_cannot_do(single_process):
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from megaswift.models.torch_attention import TorchDotProductAttention, refuse_unsupported, with_torch_core_attention
    block = TransformerBlockSubmodules(layer_specs=[get_gpt_layer_local_spec()] * 2)
    replaced = with_torch_core_attention(block)
    assert [s.submodules.self_attention.submodules.core_attention.module for s in replaced.layer_specs] == \
        [TorchDotProductAttention] * 2
    assert block.layer_specs[0].submodules.self_attention.submodules.core_attention.__name__ == "DotProductAttention"
    spec = get_gpt_layer_local_spec()
    attention = spec.submodules.self_attention
    other = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=torch.nn.Identity))))
    with pytest.raises(ValueError, match="replaces megatron-core's DotProductAttention, but this model's layers "
                                         "use 'Identity'; use model.layer_spec=local or te"):
        with_torch_core_attention(other)
    with pytest.raises(ValueError, match=r"does not support window_size=\(8, 0\) \(sliding-window attention\); "
                                         r"use model.layer_spec=local or te"):
        refuse_unsupported(attention_config(window_size=(8, 0)), layer_number=1)


# --- on a GPU: FlexAttention and SDPA with gradients ----------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention trains only on a GPU")
def test_flex_attention_trains_like_sdpa_on_a_gpu(single_process):
    from megaswift.models import torch_attention as ta
    _, torch_attention = core_attentions(attention_config())
    tensors = [t.detach().cuda().requires_grad_() for t in qkv(384, 2, seed=2)]
    mask = packed_mask([[0, 100, 300, 384], [0, 200, 384]], 384).cuda()
    assert ta.use_flex_attention(tensors[0], 0.0)
    flex_out, flex_grads = outputs_and_grads(torch_attention, tensors, mask)
    sdpa = lambda q, k, v, m: torch_attention._sdpa(*(x.permute(1, 2, 0, 3) for x in (q, k, v)), ~m, False, 0.0) \
        .permute(2, 0, 1, 3).reshape(384, 2, 64)
    sdpa_out, sdpa_grads = outputs_and_grads(sdpa, tensors, mask)
    # Loose enough for TF32 inside either kernel; attention leaking across samples moves outputs by O(1).
    torch.testing.assert_close(flex_out, sdpa_out, rtol=5e-3, atol=5e-3)
    for a, b in zip(flex_grads, sdpa_grads):
        torch.testing.assert_close(a, b, rtol=5e-3, atol=5e-3)
