"""The pre-norm SwiGLU decoder the seven first families share (Llama's design): its TransformerConfig
fields, rope arguments, layer spec and preset base. A family that differs passes its own function
for that part to its `ModelFamily` and keeps the rest.
"""
import torch.nn.functional as F

from megaswift.config import ConfigError
from megaswift.models.families.hf_view import HfConfigView

SUPPORTED_ROPE_TYPES = ("llama3", "default")
# megatron-core hard-codes llama3 scaling's other three constants; configs that differ are refused.
LLAMA3_ROPE_CONSTANTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def moe_fields(view: HfConfigView) -> dict:
    if view.moe is None:
        return {}
    moe = view.moe
    if moe.dense_layers:
        raise ConfigError("HF config: dense layers inside an MoE model (mlp_only_layers / decoder_sparse_step != 1)"
                          " are not supported yet")
    fields = {
        "num_moe_experts": moe.num_experts,
        "moe_router_topk": moe.experts_per_token,
        "moe_ffn_hidden_size": moe.ffn_hidden_size,
        "moe_router_pre_softmax": not moe.norm_topk_prob,
        "moe_aux_loss_coeff": moe.aux_loss_coef,
        "moe_router_load_balancing_type": "aux_loss" if moe.aux_loss_coef else "none",
        "moe_router_dtype": "fp32",
    }
    if moe.shared_expert_ffn_hidden_size:
        fields["moe_shared_expert_intermediate_size"] = moe.shared_expert_ffn_hidden_size
        fields["moe_shared_expert_gate"] = moe.shared_expert_gate
    return fields


def transformer_fields(view: HfConfigView) -> dict:
    if view.hidden_act != "silu":
        raise ConfigError(f"HF config: hidden_act={view.hidden_act!r} is not supported; expected 'silu'")
    if view.rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"HF config: rope settings {view.rope!r} are not supported; supported rope_type: llama3")
    return {
        "num_layers": view.num_layers,
        "hidden_size": view.hidden_size,
        "ffn_hidden_size": view.ffn_hidden_size,
        "num_attention_heads": view.num_attention_heads,
        "num_query_groups": view.num_kv_heads,
        "kv_channels": view.head_dim,
        "normalization": "RMSNorm",
        "layernorm_epsilon": view.norm_eps,
        "gated_linear_unit": True,
        "activation_func": F.silu,
        "add_bias_linear": False,
        "add_qkv_bias": view.qkv_bias,
        "qk_layernorm": view.qk_norm,
        "attention_dropout": view.attention_dropout,
        "hidden_dropout": view.hidden_dropout,
        **moe_fields(view),
    }


def model_kwargs(view: HfConfigView) -> dict:
    """RoPE, with llama3 frequency scaling where the config asks for it."""
    rope = view.rope
    kwargs = {"position_embedding_type": "rope", "rotary_base": int(rope["rope_theta"])}
    if rope["rope_type"] == "llama3":
        for key, value in LLAMA3_ROPE_CONSTANTS.items():
            if float(rope.get(key, value)) != value:
                raise ConfigError(f"HF config: rope_scaling.{key}={rope[key]} is not supported; "
                                  f"megatron-core implements llama3 scaling with {key}={value}")
        kwargs.update(rope_scaling=True, rope_scaling_factor=float(rope["factor"]))
    return kwargs


def layer_spec(config, transformer_engine: bool, vp_stage: int | None = None):
    """One spec for every layer (so for every chunk): megatron-core's Transformer Engine spec, or its
    local one."""
    if transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=config.num_moe_experts, moe_grouped_gemm=bool(config.num_moe_experts),
            qk_layernorm=config.qk_layernorm)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    return get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False,
                                    qk_layernorm=config.qk_layernorm, normalization=config.normalization)


# --- presets ----------------------------------------------------------------------------------------
BASE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "attention_bias": False,
    "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02,
}


def tiny(**fields) -> dict:
    """Tiny shapes for CPU tests and the README demo. The vocab holds the tiny BPE tokenizer's 1024 tokens
    and is deliberately NOT a multiple of 128: megatron pads it (to 1152 at TP=1, 1280 at TP=2), so
    conversion, training and export all meet vocabulary padding, as with most real tokenizers."""
    return {**BASE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1030,
            "max_position_embeddings": 512, **fields}
