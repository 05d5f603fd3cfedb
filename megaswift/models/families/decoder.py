"""The pre-norm SwiGLU decoder the seven first families share (Llama's design): its TransformerConfig
fields, rope arguments, layer spec and preset base. A family that differs passes its own function
for that part to its `ModelFamily` and keeps the rest.
"""
import copy

import torch.nn.functional as F

from megaswift.config import ConfigError
from megaswift.models.families.hf_view import HfConfigView, MoeFacts

SUPPORTED_ROPE_TYPES = ("llama3", "default")
# megatron-core hard-codes llama3 scaling's other three constants; configs that differ are refused.
LLAMA3_ROPE_CONSTANTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def moe_layer_freq(view: HfConfigView) -> int | list[int]:
    """megatron-core's per-layer MoE pattern (1: experts, 0: dense MLP). An all-MoE model keeps the int 1,
    so its checkpoints keep megatron's stacked-layer keys; a list switches megatron-core to per-layer keys."""
    if not view.moe.dense_layers:
        return 1
    return [int(view.is_moe_layer(layer)) for layer in range(view.num_layers)]


def sigmoid_router_fields(moe: MoeFacts) -> dict:
    """DeepSeek-V3's router in megatron-core's terms; what megatron computes differently is refused."""
    if not moe.norm_topk_prob and moe.experts_per_token > 1:
        raise ConfigError("HF config: norm_topk_prob=false with sigmoid routing is not supported; megatron-core "
                          "always renormalises the chosen sigmoid scores")
    if moe.num_groups and moe.experts_per_token // moe.group_topk != 2:
        # megatron scores a group by its best topk // group_topk experts, transformers by its best 2
        raise ConfigError(f"HF config: num_experts_per_tok={moe.experts_per_token} with topk_group="
                          f"{moe.group_topk} is not supported; megatron-core's group-limited routing equals "
                          f"transformers' only when num_experts_per_tok == 2 * topk_group")
    return {
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": moe.expert_bias,
        "moe_router_num_groups": moe.num_groups,
        "moe_router_group_topk": moe.group_topk,
        "moe_router_topk_scaling_factor": moe.scaling_factor,
    }


def moe_fields(view: HfConfigView) -> dict:
    if view.moe is None:
        return {}
    moe = view.moe
    fields = {
        "num_moe_experts": moe.num_experts,
        "moe_router_topk": moe.experts_per_token,
        "moe_ffn_hidden_size": moe.ffn_hidden_size,
        "moe_router_pre_softmax": not moe.norm_topk_prob and moe.score_function == "softmax",
        "moe_aux_loss_coeff": moe.aux_loss_coef,
        "moe_router_load_balancing_type": "aux_loss" if moe.aux_loss_coef else "none",
        "moe_router_dtype": "fp32",
        "moe_layer_freq": moe_layer_freq(view),
    }
    if moe.score_function == "sigmoid":
        fields.update(sigmoid_router_fields(moe))
    if moe.shared_expert_ffn_hidden_size:
        fields["moe_shared_expert_intermediate_size"] = moe.shared_expert_ffn_hidden_size
        fields["moe_shared_expert_gate"] = moe.shared_expert_gate
    return fields


def transformer_fields(view: HfConfigView) -> dict:
    if view.rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"HF config: rope settings {view.rope!r} are not supported; supported rope_type: llama3")
    return block_fields(view)


def block_fields(view: HfConfigView) -> dict:
    """Everything but the rope: sizes, SwiGLU, RMSNorm, biases, qk-norm, dropouts, MoE routing."""
    if view.hidden_act != "silu":
        raise ConfigError(f"HF config: hidden_act={view.hidden_act!r} is not supported; expected 'silu'")
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
    if view.rotary_percent != 1.0:
        kwargs["rotary_percent"] = view.rotary_percent
    return kwargs


def layer_spec(config, transformer_engine: bool, vp_stage: int | None = None):
    """One spec for every layer (so for every chunk): megatron-core's Transformer Engine spec, or its
    local one."""
    if transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=config.num_moe_experts, moe_grouped_gemm=bool(config.moe_grouped_gemm),
            qk_layernorm=config.qk_layernorm, multi_latent_attention=config.multi_latent_attention)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    return get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False,
                                    qk_layernorm=config.qk_layernorm, normalization=config.normalization,
                                    multi_latent_attention=config.multi_latent_attention)


def _with_mla(config, spec):
    """Multi-latent attention on megatron-core's local spec needs its core attention sized for MLA (and no
    q norm without a q bottleneck)."""
    if not config.multi_latent_attention:
        return spec
    from megaswift.models.families.mla_attention import with_local_mla_attention
    return with_local_mla_attention(spec, config.q_lora_rank)


def block_spec(config, transformer_engine: bool, vp_stage: int | None = None):
    """`layer_spec` where every layer is alike; where `moe_layer_freq` keeps some layers dense, the spec of
    this model chunk's own layers (as megatron-core's get_gpt_decoder_block_spec slices them), each an
    MoE or a dense layer from `layer_spec`, so both kinds get the same backend choices."""
    pattern = config.moe_layer_freq
    if not isinstance(pattern, list) or all(pattern):
        return _with_mla(config, layer_spec(config, transformer_engine, vp_stage))
    from megatron.core.transformer.transformer_block import (LayerNormImpl, TransformerBlockSubmodules,
                                                             get_num_layers_to_build)
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
    moe = _with_mla(config, layer_spec(config, transformer_engine, vp_stage))
    dense_config = copy.copy(config)  # the same model, asked for a layer without experts
    dense_config.num_moe_experts = None
    dense = _with_mla(config, layer_spec(dense_config, transformer_engine, vp_stage))
    first = get_transformer_layer_offset(config, vp_stage=vp_stage)
    layers = range(first, first + get_num_layers_to_build(config, vp_stage=vp_stage))
    # LayerNormImpl: the final norm megatron-core gives a block built from one layer spec
    return TransformerBlockSubmodules(layer_specs=[moe if pattern[i] else dense for i in layers],
                                      layer_norm=LayerNormImpl)


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
