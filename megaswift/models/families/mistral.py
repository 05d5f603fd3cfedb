"""Mistral: Llama's design and tensors; `sliding_window` (null in the presets) is refused by layout
validation beyond the sequence length, since megatron-core's local attention does not implement it."""
from megaswift.models.families import decoder
from megaswift.models.families.blocks import ATTENTION, DENSE_MLP
from megaswift.models.families.decoder import BASE, tiny
from megaswift.models.families.family import ModelFamily
from megaswift.models.families.hf_view import read_decoder

PRESETS = {
    "tiny-mistral": tiny(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None),
    "mistral-7b": {**BASE, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
                   "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32768,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "sliding_window": None},
}


def layer_rules(view, layer: int):
    return ATTENTION + DENSE_MLP


FAMILY = ModelFamily(
    name="mistral", architectures=("MistralForCausalLM",), read=read_decoder,
    transformer_fields=decoder.transformer_fields, model_kwargs=decoder.model_kwargs, layer_spec=decoder.layer_spec,
    layer_rules=layer_rules, presets=PRESETS, tiny_preset="tiny-mistral")
