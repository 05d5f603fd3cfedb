"""Qwen2 / Qwen2.5: Llama's design plus q/k/v biases (always, whatever `attention_bias` says)."""
from functools import partial

from megaswift.models.families import decoder
from megaswift.models.families.blocks import ATTENTION, DENSE_MLP
from megaswift.models.families.decoder import BASE, tiny
from megaswift.models.families.family import ModelFamily
from megaswift.models.families.hf_view import read_decoder

PRESETS = {
    "tiny-qwen2": tiny(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rms_norm_eps=1e-6, vocab_size=1100),
    "qwen2.5-7b": {**BASE, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
                   "rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
}


def layer_rules(view, layer: int):
    return ATTENTION + DENSE_MLP  # ATTENTION's bias rule is on: the view has qkv_bias


FAMILY = ModelFamily(
    name="qwen2", architectures=("Qwen2ForCausalLM",), read=partial(read_decoder, qkv_bias=True),
    transformer_fields=decoder.transformer_fields, model_kwargs=decoder.model_kwargs, layer_spec=decoder.layer_spec,
    layer_rules=layer_rules, presets=PRESETS, tiny_preset="tiny-qwen2")
