"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): qkv biases, routed experts plus one shared expert whose
output is scaled by sigmoid(shared_expert_gate(x))."""
from converters.families.blocks import ATTENTION, EMBEDDING, FINAL, SHARED_EXPERT, moe

ARCHITECTURE = "Qwen2MoeForCausalLM"
RULES = EMBEDDING + ATTENTION + moe(
    router="mlp.gate.weight",
    gate="mlp.experts.{expert}.gate_proj.weight",
    up="mlp.experts.{expert}.up_proj.weight",
    down="mlp.experts.{expert}.down_proj.weight") + SHARED_EXPERT + FINAL
