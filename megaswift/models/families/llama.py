"""Llama 2/3/3.1/3.2 (llama3 rope, optional tied embeddings): the dense pre-norm SwiGLU GQA decoder."""
from megaswift.models.families import decoder
from megaswift.models.families.blocks import ATTENTION, DENSE_MLP
from megaswift.models.families.decoder import BASE, tiny
from megaswift.models.families.family import ModelFamily
from megaswift.models.families.hf_view import read_decoder

LLAMA_3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

PRESETS = {
    "tiny-llama": tiny(),
    # factor 32 as Llama-3.2 (megatron-core's default is 8: a dropped factor shows in the logit check).
    "tiny-llama3": tiny(rope_scaling=dict(LLAMA_3_ROPE, factor=32.0), tie_word_embeddings=True,
                        rope_theta=500000.0, vocab_size=1037),
    "llama-3.2-1b": {**BASE, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True,
                     "rope_scaling": LLAMA_3_ROPE, "bos_token_id": 128000, "eos_token_id": 128001},
    "llama-3.1-8b": {**BASE, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0,
                     "rope_scaling": dict(LLAMA_3_ROPE, factor=8.0), "bos_token_id": 128000,
                     "eos_token_id": 128001},
}


def layer_rules(view, layer: int):
    return ATTENTION + DENSE_MLP


FAMILY = ModelFamily(
    name="llama", architectures=("LlamaForCausalLM",), read=read_decoder,
    transformer_fields=decoder.transformer_fields, model_kwargs=decoder.model_kwargs, layer_spec=decoder.layer_spec,
    layer_rules=layer_rules, presets=PRESETS, tiny_preset="tiny-llama")
