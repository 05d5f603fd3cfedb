"""DeepSeek-V3 architecture (DeepseekV3ForCausalLM: DeepSeek-V3/R1, Kimi-K2, Moonlight): multi-latent
attention (megatron-core's MLA), the first `first_k_dense_replace` layers dense, then routed experts with
sigmoid scores + `e_score_correction_bias` (noaux_tc), grouped top-k (`n_group`/`topk_group`),
`routed_scaling_factor`, and `n_shared_experts` shared experts; rope or YaRN on the rope part of q/k.

Multi-token-prediction layers (`num_nextn_predict_layers`, stored as `model.layers.{num_hidden_layers}.*`)
are not supported: transformers' model has none either; hf2mcore names their tensors and leaves them out.
"""
from dataclasses import replace

from megaswift.config import ConfigError
from megaswift.models.families import decoder
from megaswift.models.families.blocks import DENSE_MLP, H, L, SIGMOID_MOE
from megaswift.models.families.decoder import BASE, tiny
from megaswift.models.families.family import ModelFamily
from megaswift.models.families.hf_view import (HfConfigView, MlaFacts, mtp_layers, read_decoder, read_sigmoid_moe,
                                              require)
from megaswift.models.families.rules import Rule

DEEPSEEK = {**BASE, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "rms_norm_eps": 1e-6,
            "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
            "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
            "v_head_dim": 128, "n_shared_experts": 1, "num_experts_per_tok": 8, "norm_topk_prob": True,
            "topk_method": "noaux_tc", "scoring_func": "sigmoid", "rope_theta": 10000.0}
KIMI = {"vocab_size": 163840, "bos_token_id": 163584, "eos_token_id": 163585, "rope_theta": 50000.0,
        "n_group": 1, "topk_group": 1}

PRESETS = {
    # config.json of deepseek-ai/DeepSeek-V3 (and -R1), moonshotai/Kimi-K2-Instruct, Moonlight-16B-A3B as released
    "deepseek-v3": {**DEEPSEEK, "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256,
                    "n_group": 8, "topk_group": 4, "first_k_dense_replace": 3, "routed_scaling_factor": 2.5,
                    "vocab_size": 129280, "max_position_embeddings": 163840, "bos_token_id": 0, "eos_token_id": 1,
                    "num_nextn_predict_layers": 1,
                    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}},
    "kimi-k2": {**DEEPSEEK, **KIMI, "num_attention_heads": 64, "num_key_value_heads": 64, "n_routed_experts": 384,
                "first_k_dense_replace": 1, "routed_scaling_factor": 2.827, "max_position_embeddings": 131072,
                "num_nextn_predict_layers": 0,
                "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                                 "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}},
    "moonlight-16b-a3b": {**DEEPSEEK, **KIMI, "hidden_size": 2048, "intermediate_size": 11264,
                          "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
                          "num_key_value_heads": 16, "q_lora_rank": None, "n_routed_experts": 64,
                          "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
                          "routed_scaling_factor": 2.446, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                          "num_nextn_predict_layers": 0},
    # layer 0 dense; 8 experts in 4 groups, 2 groups chosen, so grouped top-k is exercised; YaRN as V3's
    "tiny-deepseek-v3": tiny(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", rms_norm_eps=1e-6,
                             num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
                             qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=4,
                             n_group=4, topk_group=2, moe_intermediate_size=32, n_shared_experts=2,
                             first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                             num_nextn_predict_layers=0,
                             rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                                           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
}

# What transformers' DeepseekV3 ignores but the released configs state: anything else is another model.
EXPECTED = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "rope_interleave": True, "attention_bias": False}


def read(hf: dict) -> HfConfigView:
    for key, expected in EXPECTED.items():
        if hf.get(key, expected) != expected:
            raise ConfigError(f"HF config: {key}={hf[key]!r} is not supported for {hf['architectures'][0]}; "
                              f"megatron-core's multi-latent attention and router implement {key}={expected!r}")
    mla = MlaFacts(q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=require(hf, "kv_lora_rank"),
                   qk_nope_head_dim=require(hf, "qk_nope_head_dim"), qk_rope_head_dim=require(hf, "qk_rope_head_dim"),
                   v_head_dim=require(hf, "v_head_dim"))
    view = read_decoder(hf, moe=read_sigmoid_moe(hf))
    # every head has its own k and v (from the shared latent); q/k heads are no-rope + rope dims
    return replace(view, num_kv_heads=view.num_attention_heads, mla=mla, mtp_layers=mtp_layers(hf),
                   head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim)


def rope_fields(view: HfConfigView) -> dict:
    """MLA builds its own rope (on the qk_rope_head_dim part only): plain, or YaRN with transformers'
    attention factor and softmax scale (mscale / mscale_all_dim) mapped onto megatron-core's."""
    rope = view.rope
    fields = {"rotary_base": float(rope["rope_theta"])}
    if rope["rope_type"] == "default":
        return {**fields, "rope_type": "rope", "rotary_scaling_factor": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}
    if rope["rope_type"] != "yarn":
        raise ConfigError(f"HF config: rope settings {view.rope!r} are not supported for multi-latent attention; "
                          f"supported rope_type: default, yarn")
    for key, supported in (("truncate", True), ("attention_factor", None)):
        if rope.get(key, supported) != supported:
            raise ConfigError(f"HF config: rope_scaling.{key}={rope[key]!r} is not supported; megatron-core's YaRN "
                              f"implements {key}={supported}")
    original = rope.get("original_max_position_embeddings") or view.max_position_embeddings
    factor = rope.get("factor") or view.max_position_embeddings / original
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    return {**fields, "rope_type": "yarn", "rotary_scaling_factor": float(factor),
            "original_max_position_embeddings": int(original),
            "beta_fast": float(rope.get("beta_fast") or 32), "beta_slow": float(rope.get("beta_slow") or 1),
            # transformers divides by mscale_all_dim's factor only where both are set, as megatron-core does
            # with mscale_all_dim=0; the softmax scale uses mscale_all_dim alone on both sides
            "mscale": float(mscale) if mscale and mscale_all_dim else 1.0,
            "mscale_all_dim": float(mscale_all_dim or 0.0)}


def transformer_fields(view: HfConfigView) -> dict:
    mla = view.mla
    return {
        **decoder.block_fields(view),
        "q_lora_rank": mla.q_lora_rank,
        "kv_lora_rank": mla.kv_lora_rank,
        "qk_head_dim": mla.qk_nope_head_dim,
        "qk_pos_emb_head_dim": mla.qk_rope_head_dim,
        "v_head_dim": mla.v_head_dim,
        "qk_layernorm": True,  # the latent RMSNorms (q_a_layernorm, kv_a_layernorm)
        **rope_fields(view),
    }


def model_kwargs(view: HfConfigView) -> dict:
    return {"position_embedding_type": "rope"}  # GPTModel builds no rope of its own under MLA


A = f"{L}.self_attention"
MLA_Q_LORA = (
    Rule(f"{A}.linear_q_down_proj.weight", (f"{H}.self_attn.q_a_proj.weight",)),
    Rule(f"{A}.q_layernorm.weight", (f"{H}.self_attn.q_a_layernorm.weight",)),
    Rule(f"{A}.linear_q_up_proj.weight", (f"{H}.self_attn.q_b_proj.weight",)),
)
MLA_Q = (Rule(f"{A}.linear_q_proj.weight", (f"{H}.self_attn.q_proj.weight",)),)
# Both sides keep per-head [no-rope | rope] rows for q and [k no-rope | v] rows in the kv up projection,
# and [latent | rope key] rows in the kv down projection: every tensor maps unchanged.
MLA_KV = (
    Rule(f"{L}.input_layernorm.weight", (f"{H}.input_layernorm.weight",)),
    Rule(f"{A}.linear_kv_down_proj.weight", (f"{H}.self_attn.kv_a_proj_with_mqa.weight",)),
    Rule(f"{A}.kv_layernorm.weight", (f"{H}.self_attn.kv_a_layernorm.weight",)),
    Rule(f"{A}.linear_kv_up_proj.weight", (f"{H}.self_attn.kv_b_proj.weight",)),
    Rule(f"{A}.linear_proj.weight", (f"{H}.self_attn.o_proj.weight",)),
)


def layer_rules(view: HfConfigView, layer: int):
    attention = (MLA_Q_LORA if view.mla.q_lora_rank else MLA_Q) + MLA_KV
    return attention + (SIGMOID_MOE if view.is_moe_layer(layer) else DENSE_MLP)


FAMILY = ModelFamily(
    name="deepseek-v3", architectures=("DeepseekV3ForCausalLM",), read=read,
    transformer_fields=transformer_fields, model_kwargs=model_kwargs, layer_spec=decoder.block_spec,
    layer_rules=layer_rules, presets=PRESETS, tiny_preset="tiny-deepseek-v3")
