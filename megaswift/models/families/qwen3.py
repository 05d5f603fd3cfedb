"""Qwen3: Llama's design plus per-head RMSNorm on q and k (an explicit `head_dim`)."""
from functools import partial

from megaswift.models.families import decoder
from megaswift.models.families.blocks import ATTENTION, DENSE_MLP, QK_NORM
from megaswift.models.families.decoder import BASE, tiny
from megaswift.models.families.family import ModelFamily
from megaswift.models.families.hf_view import read_decoder

PRESETS = {
    "tiny-qwen3": tiny(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32, rms_norm_eps=1e-6),
    "qwen3-8b": {**BASE, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
                 "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                 "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
}


def layer_rules(view, layer: int):
    return ATTENTION + QK_NORM + DENSE_MLP


FAMILY = ModelFamily(
    name="qwen3", architectures=("Qwen3ForCausalLM",), read=partial(read_decoder, qk_norm=True),
    transformer_fields=decoder.transformer_fields, model_kwargs=decoder.model_kwargs, layer_spec=decoder.layer_spec,
    layer_rules=layer_rules, presets=PRESETS, tiny_preset="tiny-qwen3")
