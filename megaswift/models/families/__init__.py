"""The family registry: one module per model family (llama.py, qwen3_moe.py, ...), each defining a
`FAMILY` (family.py) that holds everything megaswift knows about it. The trainer and the converters
look a model's family up here by its HF `architectures` (see docs/model-families.md to add one).
"""
import copy

from megaswift.models.families import deepseek_v3, glm4_moe, llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe
from megaswift.models.families.family import ModelFamily
from megaswift.models.families.hf_view import HfConfigView

REGISTERED: tuple[ModelFamily, ...] = tuple(m.FAMILY for m in (llama, mistral, qwen2, qwen3, mixtral, qwen2_moe,
                                                                qwen3_moe, glm4_moe, deepseek_v3))


def _by_architecture() -> dict[str, ModelFamily]:
    table = {}
    for family in REGISTERED:
        for architecture in family.architectures:
            if architecture in table:
                raise AssertionError(f"{architecture} is served by both {table[architecture].name} and {family.name}")
            table[architecture] = family
    return table


def _all_presets() -> dict[str, dict]:
    table = {}
    for family in REGISTERED:
        for name, preset in family.presets.items():
            if name in table:
                raise AssertionError(f"preset {name!r} is defined by two families (one is {family.name})")
            table[name] = preset
    return table


FAMILIES: dict[str, ModelFamily] = _by_architecture()
PRESETS: dict[str, dict] = _all_presets()


class UnsupportedModelError(ValueError):
    pass


def family_of(hf_config: dict, where: str = "config.json") -> ModelFamily:
    architectures = hf_config.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in FAMILIES:
        raise UnsupportedModelError(
            f"{where}: architectures={architectures!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[architectures[0]]


def hf_view(hf_config: dict, where: str = "config.json") -> HfConfigView:
    """The typed view of an HF config, read by its family."""
    return family_of(hf_config, where).read(hf_config)


def preset_hf_config(name: str) -> dict:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


__all__ = ["FAMILIES", "PRESETS", "REGISTERED", "HfConfigView", "ModelFamily", "UnsupportedModelError",
           "family_of", "hf_view", "preset_hf_config"]
