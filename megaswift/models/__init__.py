"""The model registry: supported HF families (one module each, megaswift/models/families/), named
presets, and their megatron-core form.

`resolve_hf_config` -> HF config dict; `hf_view` -> its typed view; `hf_to_transformer_config` ->
TransformerConfig; `build_model_chunks` -> this rank's GPTModel chunks (import it from megaswift.models.builder).
"""
from megaswift.models.families import (FAMILIES, PRESETS, HfConfigView, ModelFamily, UnsupportedModelError,
                                       family_of, hf_view, preset_hf_config)
from megaswift.models.hf_config import load_hf_config, resolve_hf_config
from megaswift.models.mcore_config import gpt_model_kwargs, hf_to_transformer_config, padded_vocab_size

__all__ = ["FAMILIES", "HfConfigView", "ModelFamily", "UnsupportedModelError", "family_of", "hf_view",
           "load_hf_config", "resolve_hf_config", "gpt_model_kwargs", "hf_to_transformer_config",
           "padded_vocab_size", "PRESETS", "preset_hf_config"]
