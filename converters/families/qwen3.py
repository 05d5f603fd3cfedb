"""Qwen3: Llama plus per-head RMSNorm on q and k."""
from converters.families.blocks import ATTENTION, DENSE_MLP, EMBEDDING, FINAL, QK_NORM

ARCHITECTURE = "Qwen3ForCausalLM"
RULES = EMBEDDING + ATTENTION + QK_NORM + DENSE_MLP + FINAL
