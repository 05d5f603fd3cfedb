"""Mixtral: Llama attention, MoE MLP under `block_sparse_moe` with experts w1 (gate), w3 (up), w2 (down)."""
from converters.families.blocks import ATTENTION, EMBEDDING, FINAL, moe

ARCHITECTURE = "MixtralForCausalLM"
RULES = EMBEDDING + ATTENTION + moe(
    router="block_sparse_moe.gate.weight",
    gate="block_sparse_moe.experts.{expert}.w1.weight",
    up="block_sparse_moe.experts.{expert}.w3.weight",
    down="block_sparse_moe.experts.{expert}.w2.weight") + FINAL
