"""What megaswift knows about one model family, in one object; each family module defines one.

A family reads its HF config into a typed view (`read`), maps the view to megatron-core's
TransformerConfig fields and GPTModel arguments (`transformer_fields`, `model_kwargs`), chooses the
layer spec (`layer_spec`, per layer where layers differ), lists its conversion rules (`first_rules`,
`layer_rules(view, layer)`, `last_rules`) and names its presets, one of them the tiny test preset.
"""
from dataclasses import dataclass
from typing import Callable

from megaswift.models.families import blocks
from megaswift.models.families.hf_view import HfConfigView
from megaswift.models.families.rules import Rule, TensorMapping, expand


@dataclass(frozen=True)
class ModelFamily:
    name: str                          # also the tiny model's name in the tests, e.g. "qwen2-moe"
    architectures: tuple[str, ...]     # HF `architectures[0]` values served
    read: Callable[[dict], HfConfigView]
    # The family's part of TransformerConfig (sizes, activation, norm, bias, MoE routing, per-layer
    # patterns such as moe_layer_freq); parallelism, precision and fusions are set by mcore_config.
    transformer_fields: Callable[[HfConfigView], dict]
    # GPTModel arguments beyond the vocabulary and the tied embeddings: position embedding and rope.
    model_kwargs: Callable[[HfConfigView], dict]
    # (TransformerConfig, use Transformer Engine?, virtual pipeline stage) -> the spec of that model
    # chunk's layers: one ModuleSpec for all, or where layers differ a TransformerBlockSubmodules of
    # the chunk's own layers (as megatron-core's get_gpt_decoder_block_spec builds from moe_layer_freq).
    layer_spec: Callable
    layer_rules: Callable[[HfConfigView, int], tuple[Rule, ...]]
    presets: dict[str, dict]
    tiny_preset: str                   # the preset the tests build a tiny random model of
    first_rules: tuple[Rule, ...] = blocks.EMBEDDING
    last_rules: tuple[Rule, ...] = blocks.FINAL

    def __post_init__(self):
        if self.tiny_preset not in self.presets:
            raise ValueError(f"family {self.name}: tiny_preset {self.tiny_preset!r} is not one of its presets")

    def tensor_mappings(self, view: HfConfigView) -> list[TensorMapping]:
        return expand(view, self.first_rules, self.layer_rules, self.last_rules)
