"""HF config dict -> megatron-core `TransformerConfig` + the `GPTModel` constructor arguments.

The HF config stays the single description of a model: it is recorded in every checkpoint, and
`mcore2hf` writes it back unchanged, so no reverse mapping of sizes is needed.
"""
import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megaswift.config import ConfigError, ParallelConfig
from megaswift.models.families import Family, family_of

VOCAB_DIVISIBLE_BY = 128  # pad the vocab like Megatron does, so embedding shards stay aligned


def padded_vocab_size(vocab_size: int, tensor_parallel: int) -> int:
    multiple = VOCAB_DIVISIBLE_BY * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def _require(hf: dict, key: str):
    if key not in hf:
        raise ConfigError(f"HF config: missing key {key!r} (needed to build a {hf.get('architectures')} model)")
    return hf[key]


def head_dim(hf: dict) -> int:
    return hf.get("head_dim") or _require(hf, "hidden_size") // _require(hf, "num_attention_heads")


def rope_parameters(hf: dict) -> dict:
    """RoPE settings from either config style: transformers < 5 writes `rope_theta` + `rope_scaling`,
    transformers 5 writes one `rope_parameters` dict (holding `rope_theta` and `rope_type`)."""
    params = {"rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_scaling") or {})}
    params.update(hf.get("rope_parameters") or {})
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def dropout_fields(hf: dict) -> dict:
    """HF's dropout probabilities: `attention_dropout` (attention probabilities, as megatron-core's) and
    `hidden_dropout` (after attention and MLP, where a config has it; Llama/Qwen/Mistral configs have none
    and apply none). Absent fields mean 0, as in transformers."""
    fields = {}
    for key in ("attention_dropout", "hidden_dropout"):
        value = 0.0 if hf.get(key) is None else hf[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
            raise ConfigError(f"HF config: {key}={value!r} must be a probability in [0, 1)")
        fields[key] = float(value)
    return fields


def _moe_fields(hf: dict, family: Family) -> dict:
    if not family.moe:
        return {}
    num_experts = hf.get("num_local_experts") or _require(hf, "num_experts")
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise ConfigError("HF config: dense layers inside an MoE model (mlp_only_layers / decoder_sparse_step != 1)"
                          " are not supported yet")
    fields = {
        "num_moe_experts": num_experts,
        "moe_router_topk": _require(hf, "num_experts_per_tok"),
        "moe_ffn_hidden_size": hf.get("moe_intermediate_size") or _require(hf, "intermediate_size"),
        "moe_router_pre_softmax": not hf.get("norm_topk_prob", family.norm_topk_prob_default),
        "moe_aux_loss_coeff": float(hf.get("router_aux_loss_coef", 0.0)),
        "moe_router_load_balancing_type": "aux_loss" if hf.get("router_aux_loss_coef") else "none",
        "moe_router_dtype": "fp32",
    }
    if family.shared_expert and hf.get("shared_expert_intermediate_size"):
        fields["moe_shared_expert_intermediate_size"] = hf["shared_expert_intermediate_size"]
        fields["moe_shared_expert_gate"] = True
    return fields


def hf_to_transformer_config(hf: dict, parallel: ParallelConfig, params_dtype: torch.dtype = torch.float32,
                             moe_token_dispatcher: str = "alltoall", init_std: float | None = None,
                             on_gpu: bool = False) -> TransformerConfig:
    family = family_of(hf)
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"HF config: hidden_act={hf['hidden_act']!r} is not supported; expected 'silu'")
    rope = rope_parameters(hf)
    if rope["rope_type"] not in ("llama3", "default"):
        raise ConfigError(f"HF config: rope settings {rope!r} are not supported; supported rope_type: llama3")
    return TransformerConfig(
        num_layers=_require(hf, "num_hidden_layers"),
        hidden_size=_require(hf, "hidden_size"),
        ffn_hidden_size=_require(hf, "intermediate_size"),
        num_attention_heads=_require(hf, "num_attention_heads"),
        num_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        kv_channels=head_dim(hf),
        normalization="RMSNorm",
        layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=family.qkv_bias or bool(hf.get("attention_bias")),
        qk_layernorm=family.qk_norm,
        **dropout_fields(hf),
        init_method_std=init_std if init_std is not None else hf.get("initializer_range", 0.02),
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        context_parallel_size=parallel.context,
        expert_model_parallel_size=parallel.expert,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        # Fusions need apex / TE / CUDA; off on CPU, megatron-core's own choices on GPU.
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        calculate_per_token_loss=True,  # loss = sum over tokens / tokens, exact across micro-batches and DP
        moe_token_dispatcher_type=moe_token_dispatcher,
        **_moe_fields(hf, family),
    )


def gpt_model_kwargs(hf: dict, tensor_parallel: int) -> dict:
    """The `GPTModel` arguments that come from the HF config rather than from TransformerConfig."""
    rope = rope_parameters(hf)
    kwargs = {
        "vocab_size": padded_vocab_size(_require(hf, "vocab_size"), tensor_parallel),
        "max_sequence_length": _require(hf, "max_position_embeddings"),
        "position_embedding_type": "rope",
        "rotary_base": int(rope["rope_theta"]),
        "share_embeddings_and_output_weights": bool(hf.get("tie_word_embeddings", False)),
    }
    if rope["rope_type"] == "llama3":
        # megatron-core hard-codes llama3's other three constants; refuse configs that differ from them.
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for key, value in expected.items():
            if float(rope.get(key, value)) != value:
                raise ConfigError(f"HF config: rope_scaling.{key}={rope[key]} is not supported; "
                                  f"megatron-core implements llama3 scaling with {key}={value}")
        kwargs.update(rope_scaling=True, rope_scaling_factor=float(rope["factor"]))
    return kwargs
