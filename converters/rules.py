"""A family mapping is a table of `Rule`s; `expand_rules` turns it into one `TensorMapping` per tensor.

Names on the megatron side are the state-dict names of megatron-core's GPTModel at TP=1 with the
local layer spec (layer numbers global); `mcore_layout` maps each to its on-disk sharded key.
`{layer}` and `{expert}` are filled in from the HF config.
"""
from dataclasses import dataclass
from typing import Callable

from converters.transforms import IDENTITY, Dims, Transform
from megaswift.models import head_dim


def always(hf: dict) -> bool:
    return True


@dataclass(frozen=True)
class Rule:
    mcore: str
    hf: tuple[str, ...]
    transform: Transform = IDENTITY
    when: Callable[[dict], bool] = always  # a predicate on the HF config, e.g. untied embeddings


@dataclass(frozen=True)
class TensorMapping:
    mcore: str
    hf: tuple[str, ...]
    transform: Transform


def dims_of(hf: dict) -> Dims:
    heads = hf["num_attention_heads"]
    return Dims(num_heads=heads, num_query_groups=hf.get("num_key_value_heads") or heads,
                head_dim=head_dim(hf), vocab_size=hf["vocab_size"])


def num_experts(hf: dict) -> int:
    return hf.get("num_local_experts") or hf.get("num_experts") or 0


def _fill(rule: Rule, **names) -> TensorMapping:
    return TensorMapping(rule.mcore.format(**names), tuple(p.format(**names) for p in rule.hf), rule.transform)


def expand_rules(rules: tuple[Rule, ...], hf: dict) -> list[TensorMapping]:
    """Model order: the rules before the first per-layer rule, then layer by layer, then the rest."""
    active = [r for r in rules if r.when(hf)]
    per_layer = [r for r in active if "{layer}" in r.mcore]
    first_layer_rule = active.index(per_layer[0]) if per_layer else len(active)
    head = [r for r in active[:first_layer_rule] if r not in per_layer]
    tail = [r for r in active[first_layer_rule:] if r not in per_layer]
    mappings = [_fill(r) for r in head]
    for layer in range(hf["num_hidden_layers"]):
        for rule in per_layer:
            experts = range(num_experts(hf)) if "{expert}" in rule.mcore else [None]
            mappings += [_fill(rule, layer=layer, expert=e) for e in experts]
    mappings += [_fill(r) for r in tail]
    return mappings
