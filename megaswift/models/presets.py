"""Named models as HF config dicts: the HF config is the one description of a model in megaswift."""
import copy

_LLAMA_3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}

_BASE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "attention_bias": False,
    "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02,
}


def _tiny(**fields) -> dict:
    """Tiny shapes for CPU tests and the README demo. The vocab holds the tiny BPE tokenizer's 1024 tokens
    and is deliberately NOT a multiple of 128: megatron pads it (to 1152 at TP=1, 1280 at TP=2), so
    conversion, training and export all meet vocabulary padding, as with most real tokenizers."""
    return {**_BASE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1030,
            "max_position_embeddings": 512, **fields}


_MOE_TINY = {"num_local_experts": 4, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.0}

PRESETS: dict[str, dict] = {
    "tiny-llama": _tiny(),
    # factor 32 as Llama-3.2 (megatron-core's default is 8: a dropped factor shows in the logit check).
    "tiny-llama3": _tiny(rope_scaling=dict(_LLAMA_3_ROPE, factor=32.0), tie_word_embeddings=True,
                         rope_theta=500000.0, vocab_size=1037),
    "tiny-mistral": _tiny(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None),
    "tiny-qwen2": _tiny(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rms_norm_eps=1e-6, vocab_size=1100),
    "tiny-qwen3": _tiny(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32, rms_norm_eps=1e-6),
    "tiny-mixtral": _tiny(architectures=["MixtralForCausalLM"], model_type="mixtral", **_MOE_TINY),
    "tiny-qwen2-moe": _tiny(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", vocab_size=1100,
                            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                            shared_expert_intermediate_size=96,
                            norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                            router_aux_loss_coef=0.0),
    "tiny-qwen3-moe": _tiny(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True, head_dim=32,
                            decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.0),
    "llama-3.2-1b": {**_BASE, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True,
                     "rope_scaling": _LLAMA_3_ROPE, "bos_token_id": 128000, "eos_token_id": 128001},
    "llama-3.1-8b": {**_BASE, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0,
                     "rope_scaling": dict(_LLAMA_3_ROPE, factor=8.0), "bos_token_id": 128000,
                     "eos_token_id": 128001},
    "mistral-7b": {**_BASE, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
                   "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32768,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "sliding_window": None},
    "qwen2.5-7b": {**_BASE, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
                   "rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
    "qwen3-8b": {**_BASE, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
                 "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                 "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
    "mixtral-8x7b": {**_BASE, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                     "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                     "max_position_embeddings": 32768, "rope_theta": 1000000.0, "num_local_experts": 8,
                     "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02},
    "qwen3-30b-a3b": {**_BASE, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                      "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                      "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
                      "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
                      "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "num_experts": 128,
                      "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
                      "mlp_only_layers": [], "router_aux_loss_coef": 0.001},
}


def preset_hf_config(name: str) -> dict:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
