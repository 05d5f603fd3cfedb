"""PEFT adapter folders (adapter_config.json + adapter_model.safetensors): read, check, write.

What megaswift's tuner can represent is a LoRA/DoRA adapter with one rank and one alpha for every targeted
module, on every layer, without bias or fan_in_fan_out, plus modules_to_save trained in full. Anything else
in adapter_config.json is refused naming the key, before anything is written. Tensor names in
adapter_model.safetensors: `base_model.model.<HF module>.lora_A.weight` (r, in), `.lora_B.weight` (out, r),
`.lora_magnitude_vector` (out,) for DoRA, and `base_model.model.<HF name>` for a modules_to_save weight.
"""
import json
import re
from pathlib import Path

import torch

from converters.errors import ConversionError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# Options with these values mean nothing megaswift would lose; any other value is refused.
NEUTRAL_OPTIONS = {"bias": ("none",), "fan_in_fan_out": (False,), "rank_pattern": ({}, None),
                   "alpha_pattern": ({}, None), "layers_to_transform": (None, []), "layers_pattern": (None, []),
                   "layer_replication": (None,), "use_qalora": (False, None), "lora_bias": (False, None),
                   "exclude_modules": (None, [], ""), "target_parameters": (None, []),
                   "trainable_token_indices": (None, {}), "alora_invocation_tokens": (None,)}
# `model.layers.3.` (any parents) in front of a module's path within a decoder layer
LAYER_PREFIX = re.compile(r"^(?:.*\.)?layers\.\d+\.(.+)$")
# What modules_to_save may name, and the HF weight each trains in full.
MODULES_TO_SAVE = {"embed_tokens": "model.embed_tokens.weight", "lm_head": "lm_head.weight"}


def read_peft_config(folder: Path) -> dict:
    file = Path(folder) / ADAPTER_CONFIG
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{file}: missing; a PEFT adapter folder holds adapter_config.json and "
                              f"{ADAPTER_WEIGHTS}") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{file}: invalid JSON: {e}") from None


def tuner_from_peft_config(config: dict, file: Path) -> dict:
    """megaswift's tuner settings (TunerConfig fields) for a PEFT LoRA config; ConversionError naming the key
    for what they cannot express."""
    if config.get("peft_type") != "LORA":
        raise ConversionError(f"{file}: peft_type is {config.get('peft_type')!r}; megaswift imports LoRA adapters "
                              f"(peft_type LORA, with use_dora for DoRA) only")
    for key, allowed in NEUTRAL_OPTIONS.items():
        if key in config and config[key] not in allowed:
            raise ConversionError(f"{file}: {key}={config[key]!r} is not supported (megaswift's LoRA has one rank and "
                                  f"alpha for every module on every layer, no bias): expected {allowed[0]!r}")
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        raise ConversionError(f"{file}: target_modules={targets!r} is a regular expression; megaswift needs a list "
                              f"of module names (or all-linear)")
    names = ["all-linear"] if targets == "all-linear" else target_names(targets or [], file)
    if not names:
        raise ConversionError(f"{file}: target_modules is empty")
    saved = list(config.get("modules_to_save") or [])
    unknown = [m for m in saved if m not in MODULES_TO_SAVE]
    if unknown:
        raise ConversionError(f"{file}: modules_to_save {unknown} are not supported; megaswift trains "
                              f"{sorted(MODULES_TO_SAVE)} in full")
    return {"type": "dora" if config.get("use_dora") else "lora", "rank": int(config["r"]),
            "alpha": float(config["lora_alpha"]), "dropout": float(config.get("lora_dropout") or 0.0),
            "rslora": bool(config.get("use_rslora")), "targets": ",".join(names), "modules_to_save": saved}


def target_names(targets: list, file: Path) -> list[str]:
    """megaswift target names for PEFT's target_modules list. Qualified names are kept: PEFT matches a name as
    the whole module name or a suffix after a '.', as select_targets does, so `mlp.down_proj` must stay apart
    from the routed experts' `down_proj` on MoE models. A name spelled from the model's root for one layer
    (`model.layers.3.mlp.down_proj`) becomes its path within the layer: megaswift adapts a module on every
    layer, and the adapter's tensors are checked to cover every layer afterwards."""
    if not isinstance(targets, list):
        raise ConversionError(f"{file}: target_modules={targets!r} is not a list of module names (or all-linear)")
    names = set()
    for target in targets:
        if not isinstance(target, str) or "," in target or not target.strip():
            raise ConversionError(f"{file}: target_modules entry {target!r} is not a module name; expected names "
                                  f"such as 'q_proj' or 'mlp.down_proj'")
        in_layer = LAYER_PREFIX.match(target.strip())
        names.add(in_layer.group(1) if in_layer else target.strip())
    return sorted(names)


def read_peft_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The adapter's tensors by their PEFT names, and the file they came from."""
    folder = Path(folder)
    if (folder / ADAPTER_WEIGHTS).is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(folder / ADAPTER_WEIGHTS), folder / ADAPTER_WEIGHTS
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"{folder / ADAPTER_WEIGHTS}: cannot read (truncated or corrupt?): {e}") from None
    if (folder / ADAPTER_WEIGHTS_BIN).is_file():
        try:
            return torch.load(folder / ADAPTER_WEIGHTS_BIN, map_location="cpu", weights_only=True), \
                folder / ADAPTER_WEIGHTS_BIN
        except Exception as e:  # torch.load raises many types for a corrupt file
            raise ConversionError(f"{folder / ADAPTER_WEIGHTS_BIN}: cannot read (truncated or corrupt?): {e}") from None
    raise ConversionError(f"{folder}: no adapter weights; expected {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_BIN})")


def split_modules_to_save(tensors: dict[str, torch.Tensor], modules_to_save: list[str], file: Path
                          ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the LoRA tensors, the modules_to_save weights by HF name) of an adapter's tensors."""
    full = {}
    for module in modules_to_save:
        key = PEFT_PREFIX + MODULES_TO_SAVE[module]
        if key not in tensors:
            raise ConversionError(f"{file}: adapter_config.json lists {module!r} in modules_to_save, but {key!r} is "
                                  f"not in the file")
        full[MODULES_TO_SAVE[module]] = tensors[key]
    lora = {k: v for k, v in tensors.items() if k[len(PEFT_PREFIX):] not in full}
    return lora, full


def modules_peft_moves_to_experts(model_type: str | None) -> set[str]:
    """HF module names that the installed PEFT, on transformers 5, maps onto an MoE model's fused routed-expert
    parameters wherever they sit (its MoE target conversion, keyed by transformers' conversion pattern of the
    model type): for those model types an adapter on a dense-layer or shared-expert `gate_proj` would load
    into the routed experts, or be ignored, without an error. Empty for other model types and for PEFT
    versions without that conversion."""
    try:
        from peft.utils.transformers_weight_conversion import (_MODEL_TO_CONVERSION_PATTERN,
                                                               _MOE_TARGET_MODULE_MAPPING)
    except ImportError:
        return set()
    return set(_MOE_TARGET_MODULE_MAPPING.get(_MODEL_TO_CONVERSION_PATTERN.get(model_type), {}))


def check_peft_can_load(tensors: dict[str, torch.Tensor], model_type: str | None, ckpt: Path) -> None:
    """Refuses to write a PEFT folder that PeftModel would load wrongly (modules_peft_moves_to_experts)."""
    moved = modules_peft_moves_to_experts(model_type)
    hit = sorted({key.split(".lora_")[0] for key in tensors
                  if ".lora_" in key and key.split(".lora_")[0].rsplit(".", 1)[-1] in moved})
    if hit:
        import peft
        raise ConversionError(
            f"{ckpt}: this adapter adapts {len(hit)} MLP modules of a {model_type} model ({hit[0][len(PEFT_PREFIX):]}"
            f" ...); PEFT {peft.__version__} with transformers 5 loads {sorted(moved)} of {model_type} models as the "
            f"routed experts' fused parameters, so PeftModel would misplace or ignore these tensors without an "
            f"error. Export the merged model instead (`megaswift convert mcore2hf {ckpt} OUT --merge`), or train "
            f"with targets that leave them out (e.g. --tuner.targets q_proj,k_proj,v_proj,o_proj)")


def write_peft_adapter(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(folder / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
