"""Conversion rules: a family says, for the model's ends and for each layer, which HF tensors make
which megatron-core tensor and how (a `Transform`); `expand` turns that into one `TensorMapping` per
tensor, the list both conversion directions walk.

Names on the megatron side are the state-dict names of megatron-core's GPTModel at TP=1 with the
local layer spec (layer numbers global); `converters.mcore_layout` maps each to its on-disk sharded key.
`{layer}` and `{expert}` are filled in from the HF config view.
"""
from dataclasses import dataclass
from typing import Callable

from megaswift.models.families.hf_view import HfConfigView
from megaswift.models.families.transforms import IDENTITY, Dims, Transform


def always(view: HfConfigView) -> bool:
    return True


@dataclass(frozen=True)
class Rule:
    mcore: str
    hf: tuple[str, ...]
    transform: Transform = IDENTITY
    when: Callable[[HfConfigView], bool] = always  # a predicate on the config, e.g. untied embeddings
    # False: a conversion's dtype cast (hf2mcore --dtype) leaves this tensor in its stored dtype, as
    # megatron-core keeps it (the routers' fp32 expert bias: rounding it to bf16 reorders close experts)
    cast: bool = True


@dataclass(frozen=True)
class TensorMapping:
    mcore: str
    hf: tuple[str, ...]
    transform: Transform
    cast: bool = True


def dims_of(view: HfConfigView) -> Dims:
    return Dims(num_heads=view.num_attention_heads, num_query_groups=view.num_kv_heads, head_dim=view.head_dim,
                vocab_size=view.vocab_size)


def _fill(rule: Rule, **names) -> TensorMapping:
    return TensorMapping(rule.mcore.format(**names), tuple(p.format(**names) for p in rule.hf), rule.transform,
                         rule.cast)


def expand(view: HfConfigView, first: tuple[Rule, ...], layer_rules: Callable[[HfConfigView, int], tuple[Rule, ...]],
           last: tuple[Rule, ...]) -> list[TensorMapping]:
    """Model order: the `first` rules (embedding), then layer by layer (each expert of a `{expert}`
    rule in turn), then the `last` rules (final norm, output layer)."""
    mappings = [_fill(r) for r in first if r.when(view)]
    for layer in range(view.num_layers):
        for rule in layer_rules(view, layer):
            if rule.when(view):
                experts = range(view.num_experts) if "{expert}" in rule.mcore else [None]
                mappings += [_fill(rule, layer=layer, expert=e) for e in experts]
    mappings += [_fill(r) for r in last if r.when(view)]
    return mappings


def unconverted_hf_tensors(view: HfConfigView, keys) -> dict[str, str]:
    """HF tensors a checkpoint may hold that megaswift knowingly does not convert, each with the reason:
    the multi-token-prediction layers DeepSeek-V3 and GLM-4.5 store after the decoder layers
    (`model.layers.{num_hidden_layers + i}.*`). transformers' model has none of them either; anything
    else unexpected is still an error of the coverage check."""
    prefixes = {f"model.layers.{view.num_layers + i}.": i for i in range(view.mtp_layers)}
    skipped = {}
    for key in keys:
        for prefix, i in prefixes.items():
            if key.startswith(prefix):
                skipped[key] = (f"multi-token-prediction layer {i} (num_nextn_predict_layers={view.mtp_layers}); "
                                f"megaswift trains and exports the model without it, as transformers runs it")
    return skipped
