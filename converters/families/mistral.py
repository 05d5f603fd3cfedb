"""Mistral: the same tensors as Llama."""
from converters.families.blocks import ATTENTION, DENSE_MLP, EMBEDDING, FINAL

ARCHITECTURE = "MistralForCausalLM"
RULES = EMBEDDING + ATTENTION + DENSE_MLP + FINAL
