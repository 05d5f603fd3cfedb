"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): q/k/v biases, routed experts (softmax before top-k unless
`norm_topk_prob`) plus one shared expert whose output is scaled by sigmoid(shared_expert_gate(x))."""
from megaswift.models.families import decoder
from megaswift.models.families.blocks import ATTENTION, DENSE_MLP, SHARED_EXPERT, moe
from megaswift.models.families.decoder import tiny
from megaswift.models.families.family import ModelFamily
from megaswift.models.families.hf_view import read_decoder, read_moe

PRESETS = {
    "tiny-qwen2-moe": tiny(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", vocab_size=1100,
                           num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                           shared_expert_intermediate_size=96,
                           norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                           router_aux_loss_coef=0.0),
}

MOE_MLP = moe(router="mlp.gate.weight",
              gate="mlp.experts.{expert}.gate_proj.weight",
              up="mlp.experts.{expert}.up_proj.weight",
              down="mlp.experts.{expert}.down_proj.weight") + SHARED_EXPERT


def read(hf: dict):
    return read_decoder(hf, qkv_bias=True,
                        moe=read_moe(hf, norm_topk_prob_default=False, gated_shared_expert=True))


def layer_rules(view, layer: int):
    # Layers in `mlp_only_layers` (or off `decoder_sparse_step`) have a dense MLP (moe_layer_freq).
    return ATTENTION + (MOE_MLP if view.is_moe_layer(layer) else DENSE_MLP)


FAMILY = ModelFamily(
    name="qwen2-moe", architectures=("Qwen2MoeForCausalLM",), read=read,
    transformer_fields=decoder.transformer_fields, model_kwargs=decoder.model_kwargs, layer_spec=decoder.block_spec,
    layer_rules=layer_rules, presets=PRESETS, tiny_preset="tiny-qwen2-moe")
