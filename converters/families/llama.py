"""Llama 2/3/3.1/3.2 (llama3 rope, optional tied embeddings): the dense pre-norm SwiGLU GQA decoder."""
from converters.families.blocks import ATTENTION, DENSE_MLP, EMBEDDING, FINAL

ARCHITECTURE = "LlamaForCausalLM"
RULES = EMBEDDING + ATTENTION + DENSE_MLP + FINAL
