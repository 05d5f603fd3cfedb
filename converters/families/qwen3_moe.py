"""Qwen3-MoE: q/k norms, routed experts, no shared expert."""
from converters.families.blocks import ATTENTION, EMBEDDING, FINAL, QK_NORM, moe

ARCHITECTURE = "Qwen3MoeForCausalLM"
RULES = EMBEDDING + ATTENTION + QK_NORM + moe(
    router="mlp.gate.weight",
    gate="mlp.experts.{expert}.gate_proj.weight",
    up="mlp.experts.{expert}.up_proj.weight",
    down="mlp.experts.{expert}.down_proj.weight") + FINAL
