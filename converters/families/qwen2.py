"""Qwen2 / Qwen2.5: Llama plus q/k/v biases (the qkv-bias rule in ATTENTION switches on by family)."""
from converters.families.blocks import ATTENTION, DENSE_MLP, EMBEDDING, FINAL

ARCHITECTURE = "Qwen2ForCausalLM"
RULES = EMBEDDING + ATTENTION + DENSE_MLP + FINAL
