"""One mapping table per HF architecture; `mappings_for(hf_config)` expands the right one."""
from converters.families import llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe
from converters.rules import TensorMapping, expand_rules
from megaswift.models import family_of

RULES_BY_ARCHITECTURE = {m.ARCHITECTURE: m.RULES for m in (llama, mistral, qwen2, qwen3, mixtral, qwen2_moe,
                                                           qwen3_moe)}


def mappings_for(hf: dict, where: str = "config.json") -> list[TensorMapping]:
    family = family_of(hf, where=where)  # raises UnsupportedModelError listing the supported ones
    return expand_rules(RULES_BY_ARCHITECTURE[family.architecture], hf)
