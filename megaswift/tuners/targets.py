"""Which megatron-core linear layers an adapter config targets, and which HF modules each one fuses.

Everything here is read from the family's conversion rules (`family.tensor_mappings(view)`): a rule whose
megatron-core tensor is the weight of a linear layer (linear_qkv, linear_proj, linear_fc1, linear_fc2, and
multi-latent attention's q/kv down and up projections) names the HF modules fused into it, in rule order,
and the transform that places their rows. So a family added with its rules gets LoRA on the same modules
without a second table. An adapter part is exact only where that transform moves whole rows (each HF row
lands in exactly one megatron row, values untouched): then B's rows and DoRA's magnitude follow the
same placement. Any other transform is refused by module name (`check_row_move`), never approximated.

Target names follow PEFT: a name matches an HF module whose path (relative to the layer) equals it or
ends with `.name`, so `q_proj`, `self_attn.q_proj` and `shared_expert.gate_proj` all work; `all-linear`
is every supported linear module. Routed MoE experts are refused: transformers 5 keeps them as fused
3-D parameters, which PEFT adapts (if at all) as one fused parameter, not per expert linear, so no
adapter could be exchanged. (PEFT 0.21 on transformers 5 turns any `gate_proj`/`up_proj`/`down_proj`
target of a Qwen2-MoE-like model type, glm4_moe and deepseek_v3 included, into those fused parameters.)
"""
from dataclasses import dataclass

import torch

from megaswift.config import ConfigError
from megaswift.models.families import family_of, hf_view
from megaswift.models.families.rules import TensorMapping
from megaswift.models.families.transforms import Dims, Transform

# megatron-core's linear layers an HF module can be converted into: GPT attention and MLPs, and multi-latent
# attention's projections. Only linear_proj and linear_fc2 are row-parallel; MLA's down projections are
# column-parallel like the rest (MLA gathers their outputs over TP itself), so the adapter needs nothing more.
LINEAR_NAMES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "linear_q_proj", "linear_q_down_proj",
                "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj")
ROUTED_EXPERTS = ".experts.local_experts."
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class FusedLinear:
    """One megatron-core linear layer (global name, no `.weight`) and the HF modules fused into it."""
    mcore: str                  # e.g. decoder.layers.3.self_attention.linear_qkv
    hf_modules: tuple[str, ...]  # e.g. model.layers.3.self_attn.q_proj, ... (rule order)
    transform: Transform

    @property
    def parts(self) -> tuple[str, ...]:
        """The adapter's part names: each HF module's own name (q_proj, gate_proj, down_proj)."""
        return tuple(m.rsplit(".", 1)[-1] for m in self.hf_modules)

    @property
    def routed_expert(self) -> bool:
        return ROUTED_EXPERTS in self.mcore


def check_row_move(linear: FusedLinear, dims: Dims, shape: tuple[int, ...]) -> None:
    """ConfigError naming the HF modules unless the rule's transform, at this (local) weight shape, moves
    whole rows: values unchanged, every row of each HF module placed exactly once, every megatron row
    filled exactly once. Only then is the adapter of each HF module (PEFT's A, B, magnitude) exact."""
    why = None
    if linear.transform.values is not None:
        why = "changes values"
    else:
        placement = linear.transform.placement(dims, tuple(shape))
        filled = torch.zeros(shape[0], dtype=torch.int64)
        for blocks in placement:
            # to_hf gathers a module's rows by source row: they must follow one another from row 0
            next_src = 0
            for src, dst, rows in sorted(blocks):
                if src != next_src:
                    why = "does not place every row of each HF module exactly once"
                next_src = src + rows
                filled[dst:dst + rows] += 1
        if why is None and not bool((filled == 1).all()):
            why = "leaves megatron-core rows empty or fills some twice"
    if why:
        raise ConfigError(
            f"tuner.targets: {', '.join(linear.hf_modules)} cannot be adapted: the conversion into {linear.mcore} "
            f"({linear.transform.name}) {why}, so PEFT's per-module lora_B / magnitude rows have no exact place "
            "in the megatron-core layer. Leave these modules out of tuner.targets (list the others by name).")


def _is_linear_weight(mapping: TensorMapping) -> bool:
    module, _, leaf = mapping.mcore.rpartition(".")
    return leaf == "weight" and module.rsplit(".", 1)[-1] in LINEAR_NAMES


def fused_linears(hf: dict) -> list[FusedLinear]:
    """Every linear layer of the model (global layer numbers), routed experts included."""
    view = hf_view(hf)
    return [FusedLinear(m.mcore[: -len(".weight")], tuple(h[: -len(".weight")] for h in m.hf), m.transform)
            for m in family_of(hf).tensor_mappings(view) if _is_linear_weight(m)]


def _relative(hf_module: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `self_attn.q_proj` (what a target name is matched against)."""
    parts = hf_module.split(".")
    return ".".join(parts[3:]) if parts[:2] == ["model", "layers"] else hf_module


def _matches(target: str, hf_module: str) -> bool:
    return hf_module == target or hf_module.endswith("." + target)


def valid_target_names(hf: dict) -> list[str]:
    """The names `targets` accepts for this model: each supported module's own name and its path in a layer."""
    linears = fused_linears(hf)
    names = {name for linear in linears if not linear.routed_expert for module in linear.hf_modules
             for name in (module.rsplit(".", 1)[-1], _relative(module))}
    routed = [_relative(module) for linear in linears if linear.routed_expert for module in linear.hf_modules]
    # a short name that also matches routed experts (qwen2-moe's gate_proj) is refused, so not offered
    return sorted(n for n in names if not any(_matches(n, module) for module in routed))


def parse_targets(targets: str) -> list[str]:
    return [t.strip() for t in targets.split(",") if t.strip()]


def select_targets(hf: dict, targets: str) -> dict[str, tuple[FusedLinear, tuple[str, ...]]]:
    """{megatron linear name: (the linear, the parts targeted)} for `targets`; ConfigError for a name
    that matches no supported module of this model (listing the valid ones) or only routed experts."""
    names = parse_targets(targets)
    if not names:
        raise ConfigError(f"tuner.targets is empty; give {ALL_LINEAR} or module names such as "
                          f"{', '.join(valid_target_names(hf)[:6])}")
    linears = fused_linears(hf)
    everything = ALL_LINEAR in names
    if everything and len(names) > 1:
        raise ConfigError(f"tuner.targets={targets!r}: {ALL_LINEAR} already targets every linear module; "
                          "give it alone or list module names")
    chosen: dict[str, tuple[FusedLinear, tuple[str, ...]]] = {}
    for name in ([] if everything else names):
        hits = [(linear, module) for linear in linears for module in linear.hf_modules
                if _matches(name, _relative(module)) or _matches(name, module)]
        routed = [module for linear, module in hits if linear.routed_expert]
        if routed:
            raise ConfigError(
                f"tuner.targets: {name!r} matches routed MoE experts ({routed[0]}, ...); LoRA on routed experts "
                "is not supported (transformers 5 fuses expert weights into 3-D parameters, which PEFT adapts only "
                f"as one fused parameter). Target the attention and shared-expert modules instead, e.g. {ALL_LINEAR} or "
                f"{', '.join(n for n in valid_target_names(hf) if '.' in n)}")
        if not hits:
            raise ConfigError(f"tuner.targets: unknown module name {name!r} for {family_of(hf).name}; valid names: "
                              f"{ALL_LINEAR}, {', '.join(valid_target_names(hf))}")
    for linear in linears:
        if linear.routed_expert:
            continue
        parts = tuple(part for part, module in zip(linear.parts, linear.hf_modules)
                      if everything or any(_matches(n, _relative(module)) for n in names))
        if parts:
            chosen[linear.mcore] = (linear, parts)
    return chosen
