"""flops_per_token against counts written by hand from each model's published architecture.

Per token: 6 x (weights of the matmuls it passes through) + causal attention scores, 3 x layers x seq x
heads x (qk head dim + v head dim). The architecture numbers below are typed from the released config.json
files, not read from megaswift's presets, and the weight totals are checked against the activated-parameter
figures the model makers publish.
"""
import pytest

from megaswift.models import preset_hf_config
from megaswift.train.metrics import flops_per_token

SEQ = 4096


def test_dense_llama_3_1_8b():
    h, layers, heads, kv_heads, head_dim, ffn, vocab = 4096, 32, 32, 8, 128, 14336, 128256
    attention = h * heads * head_dim + 2 * h * kv_heads * head_dim + heads * head_dim * h  # q, k + v, out
    weights = layers * (attention + 3 * h * ffn) + h * vocab
    assert weights + h * vocab == pytest.approx(8.03e9, rel=0.005)  # Meta: 8.03B parameters, with the embedding
    scores = 3 * layers * SEQ * heads * (head_dim + head_dim)
    assert flops_per_token(preset_hf_config("llama-3.1-8b"), SEQ) == 6 * weights + scores


def test_deepseek_v3_counts_multi_latent_attention_dense_layers_and_only_the_routed_experts():
    h, layers, first_dense, vocab = 7168, 61, 3, 129280
    heads, q_rank, kv_rank, nope, rope, v = 128, 1536, 512, 128, 64, 128
    attention = (h * q_rank + q_rank * heads * (nope + rope)  # q: down to the q latent, up to every head
                 + h * (kv_rank + rope)                        # the shared kv latent and the shared rope key
                 + kv_rank * heads * (nope + v)                # each head's no-rope key and its value
                 + heads * v * h)                              # output
    dense_mlp = 3 * h * 18432
    moe_mlp = 3 * h * 2048 * (8 + 1) + h * 256                 # top-8 routed + 1 shared expert; the router
    weights = layers * attention + first_dense * dense_mlp + (layers - first_dense) * moe_mlp + h * vocab
    # DeepSeek-V3 technical report: 37B activated parameters per token (input embedding included)
    assert weights + h * vocab == pytest.approx(37e9, rel=0.02)
    scores = 3 * layers * SEQ * heads * ((nope + rope) + v)
    flops = flops_per_token(preset_hf_config("deepseek-v3"), SEQ)
    assert flops == 6 * weights + scores
    assert flops == pytest.approx(6 * 37e9 + scores, rel=0.02)  # about 2.5e11, not MLA counted as GQA


def test_kimi_k2_is_near_its_published_32b_activated_parameters():
    h, layers, heads, vocab, nope, rope, v = 7168, 61, 64, 163840, 128, 64, 128
    scores = 3 * layers * SEQ * heads * ((nope + rope) + v)
    weights = (flops_per_token(preset_hf_config("kimi-k2"), SEQ) - scores) / 6
    assert weights + h * vocab == pytest.approx(32e9, rel=0.03)  # Moonshot: 32B activated, 1T in total


def test_moonlight_without_a_q_latent():
    h, layers, first_dense, vocab = 2048, 27, 1, 163840
    heads, kv_rank, nope, rope, v = 16, 512, 128, 64, 128
    attention = h * heads * (nope + rope) + h * (kv_rank + rope) + kv_rank * heads * (nope + v) + heads * v * h
    dense_mlp = 3 * h * 11264
    moe_mlp = 3 * h * 1408 * (6 + 2) + h * 64                  # top-6 routed + 2 shared experts; the router
    body = layers * attention + first_dense * dense_mlp + (layers - first_dense) * moe_mlp
    assert body == pytest.approx(2.24e9, rel=0.01)  # Moonlight's model card: 2.24B activated (no embeddings)
    scores = 3 * layers * SEQ * heads * ((nope + rope) + v)
    assert flops_per_token(preset_hf_config("moonlight-16b-a3b"), SEQ) == 6 * (body + h * vocab) + scores


@pytest.mark.parametrize("fields, dense_layers", [
    ({"mlp_only_layers": [0, 5]}, 2),
    ({"decoder_sparse_step": 2}, 24),                       # layers 0, 2, ..., 46 of 48 dense
    ({"decoder_sparse_step": 3, "mlp_only_layers": [2, 3]}, 33),  # 32 off the step, plus layer 2
])
def test_qwen_moe_dense_layers_count_as_dense(fields, dense_layers):
    h, ffn, expert_ffn, top_k, experts = 2048, 6144, 768, 8, 128  # Qwen3-30B-A3B
    all_moe = flops_per_token(preset_hf_config("qwen3-30b-a3b"), SEQ)
    with_dense = flops_per_token({**preset_hf_config("qwen3-30b-a3b"), **fields}, SEQ)
    per_layer = 3 * h * ffn - (3 * h * expert_ffn * top_k + h * experts)
    assert with_dense - all_moe == 6 * dense_layers * per_layer
