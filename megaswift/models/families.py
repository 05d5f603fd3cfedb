"""The supported HF architectures and the few facts in which they differ.

Everything else (sizes, rope, norms) is read from the HF config itself, so a family is one row here.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    architecture: str          # HF `architectures[0]`
    qkv_bias: bool = False     # Qwen2: biases on q, k and v projections
    qk_norm: bool = False      # Qwen3: RMSNorm on each head's q and k
    moe: bool = False
    shared_expert: bool = False  # Qwen2-MoE: one shared expert with a sigmoid gate
    # HF MoE routers either renormalise the top-k probabilities (softmax after top-k) or not (softmax first).
    norm_topk_prob_default: bool = True


FAMILIES: dict[str, Family] = {f.architecture: f for f in (
    Family("LlamaForCausalLM"),
    Family("MistralForCausalLM"),
    Family("Qwen2ForCausalLM", qkv_bias=True),
    Family("Qwen3ForCausalLM", qk_norm=True),
    Family("MixtralForCausalLM", moe=True),
    Family("Qwen2MoeForCausalLM", qkv_bias=True, moe=True, shared_expert=True, norm_topk_prob_default=False),
    Family("Qwen3MoeForCausalLM", qk_norm=True, moe=True, norm_topk_prob_default=False),
)}


class UnsupportedModelError(ValueError):
    pass


def family_of(hf_config: dict, where: str = "config.json") -> Family:
    architectures = hf_config.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in FAMILIES:
        raise UnsupportedModelError(
            f"{where}: architectures={architectures!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[architectures[0]]
