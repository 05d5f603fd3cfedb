"""Mixtral: Llama attention; a sparse MoE MLP under `block_sparse_moe` (router `gate`, experts w1 = gate,
w3 = up, w2 = down), top-k renormalised, expert count `num_local_experts`."""
from megaswift.models.families import decoder
from megaswift.models.families.blocks import ATTENTION, moe
from megaswift.models.families.decoder import BASE, tiny
from megaswift.models.families.family import ModelFamily
from megaswift.models.families.hf_view import read_decoder, read_moe

PRESETS = {
    "tiny-mixtral": tiny(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=4,
                         num_experts_per_tok=2, router_aux_loss_coef=0.0),
    "mixtral-8x7b": {**BASE, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                     "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                     "max_position_embeddings": 32768, "rope_theta": 1000000.0, "num_local_experts": 8,
                     "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02},
}

MOE_MLP = moe(router="block_sparse_moe.gate.weight",
              gate="block_sparse_moe.experts.{expert}.w1.weight",
              up="block_sparse_moe.experts.{expert}.w3.weight",
              down="block_sparse_moe.experts.{expert}.w2.weight")


def read(hf: dict):
    return read_decoder(hf, moe=read_moe(hf, norm_topk_prob_default=True))


def layer_rules(view, layer: int):
    return ATTENTION + MOE_MLP


FAMILY = ModelFamily(
    name="mixtral", architectures=("MixtralForCausalLM",), read=read,
    transformer_fields=decoder.transformer_fields, model_kwargs=decoder.model_kwargs, layer_spec=decoder.layer_spec,
    layer_rules=layer_rules, presets=PRESETS, tiny_preset="tiny-mixtral")
