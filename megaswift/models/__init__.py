"""The model registry: supported HF families, named presets, and their megatron-core form.

`resolve_hf_config` -> HF config dict; `hf_to_transformer_config` -> TransformerConfig;
`build_model_chunks` -> this rank's GPTModel chunks (import it from megaswift.models.builder).
"""
from megaswift.models.families import FAMILIES, Family, UnsupportedModelError, family_of
from megaswift.models.hf_config import load_hf_config, resolve_hf_config
from megaswift.models.mcore_config import (gpt_model_kwargs, head_dim, hf_to_transformer_config,
                                           padded_vocab_size)
from megaswift.models.presets import PRESETS, preset_hf_config

__all__ = ["FAMILIES", "Family", "UnsupportedModelError", "family_of", "load_hf_config", "resolve_hf_config",
           "gpt_model_kwargs", "head_dim", "hf_to_transformer_config", "padded_vocab_size", "PRESETS",
           "preset_hf_config"]
