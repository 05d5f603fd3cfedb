"""Qwen3-MoE: q/k norms, routed experts (softmax before top-k unless `norm_topk_prob`), no shared expert."""
from megaswift.models.families import decoder
from megaswift.models.families.blocks import ATTENTION, DENSE_MLP, QK_NORM, moe
from megaswift.models.families.decoder import BASE, tiny
from megaswift.models.families.family import ModelFamily
from megaswift.models.families.hf_view import read_decoder, read_moe

PRESETS = {
    "tiny-qwen3-moe": tiny(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True, head_dim=32,
                           decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.0),
    "qwen3-30b-a3b": {**BASE, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                      "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                      "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
                      "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
                      "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "num_experts": 128,
                      "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
                      "mlp_only_layers": [], "router_aux_loss_coef": 0.001},
}

MOE_MLP = moe(router="mlp.gate.weight",
              gate="mlp.experts.{expert}.gate_proj.weight",
              up="mlp.experts.{expert}.up_proj.weight",
              down="mlp.experts.{expert}.down_proj.weight")


def read(hf: dict):
    return read_decoder(hf, qk_norm=True, moe=read_moe(hf, norm_topk_prob_default=False))


def layer_rules(view, layer: int):
    # Layers in `mlp_only_layers` (or off `decoder_sparse_step`) have a dense MLP (moe_layer_freq).
    return ATTENTION + QK_NORM + (MOE_MLP if view.is_moe_layer(layer) else DENSE_MLP)


FAMILY = ModelFamily(
    name="qwen3-moe", architectures=("Qwen3MoeForCausalLM",), read=read,
    transformer_fields=decoder.transformer_fields, model_kwargs=decoder.model_kwargs, layer_spec=decoder.block_spec,
    layer_rules=layer_rules, presets=PRESETS, tiny_preset="tiny-qwen3-moe")
