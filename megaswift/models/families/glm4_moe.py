"""GLM-4.5 / GLM-4.6 MoE (Glm4MoeForCausalLM): grouped-query attention with q/k/v biases, rope on the
first `partial_rotary_factor` of each head's dims, q/k RMSNorm where `use_qk_norm`; after the first
`first_k_dense_replace` dense layers, DeepSeek-V3's MoE (sigmoid routing with the expert-bias correction,
a shared expert, `routed_scaling_factor`). Its multi-token-prediction layer is not converted (named on import).
"""
from dataclasses import replace

from megaswift.models.families import decoder
from megaswift.models.families.blocks import ATTENTION, DENSE_MLP, QK_NORM, SIGMOID_MOE
from megaswift.models.families.decoder import BASE, tiny
from megaswift.models.families.family import ModelFamily
from megaswift.models.families.hf_view import mtp_layers, read_decoder, read_sigmoid_moe

GLM = {**BASE, "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "head_dim": 128,
       "num_attention_heads": 96, "num_key_value_heads": 8, "vocab_size": 151552, "max_position_embeddings": 131072,
       "rope_theta": 1000000.0, "partial_rotary_factor": 0.5, "attention_bias": True, "n_shared_experts": 1,
       "num_experts_per_tok": 8, "norm_topk_prob": True, "n_group": 1, "topk_group": 1,
       "num_nextn_predict_layers": 1, "bos_token_id": None, "eos_token_id": [151329, 151336, 151338],
       "pad_token_id": 151329}

PRESETS = {
    # config.json of zai-org/GLM-4.5 and GLM-4.5-Air as released
    "glm-4.5": {**GLM, "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536,
                "num_hidden_layers": 92, "n_routed_experts": 160, "first_k_dense_replace": 3,
                "routed_scaling_factor": 2.5, "use_qk_norm": True},
    "glm-4.5-air": {**GLM, "hidden_size": 4096, "intermediate_size": 10944, "moe_intermediate_size": 1408,
                    "num_hidden_layers": 46, "n_routed_experts": 128, "first_k_dense_replace": 1,
                    "routed_scaling_factor": 1.0, "use_qk_norm": False},
    # layer 0 dense, experts in 2 groups with one chosen per token, so routing meets the group step too
    "tiny-glm4-moe": tiny(architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", head_dim=32,
                          partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True, n_routed_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1,
                          first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=1.5, n_group=2,
                          topk_group=1, num_nextn_predict_layers=0, rms_norm_eps=1e-5),
}


def read(hf: dict):
    view = read_decoder(hf, qk_norm=bool(hf.get("use_qk_norm")), moe=read_sigmoid_moe(hf))
    return replace(view, mtp_layers=mtp_layers(hf))


def layer_rules(view, layer: int):
    return ATTENTION + (QK_NORM if view.qk_norm else ()) + (SIGMOID_MOE if view.is_moe_layer(layer) else DENSE_MLP)


FAMILY = ModelFamily(
    name="glm4-moe", architectures=("Glm4MoeForCausalLM",), read=read,
    transformer_fields=decoder.transformer_fields, model_kwargs=decoder.model_kwargs, layer_spec=decoder.block_spec,
    layer_rules=layer_rules, presets=PRESETS, tiny_preset="tiny-glm4-moe")
