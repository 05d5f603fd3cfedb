"""Adapter tensors by their global names (the one representation of LoRA/DoRA weights megaswift uses),
and their exchange with PEFT adapter files.

Global name: `decoder.layers.{L}.self_attention.linear_qkv.adapter.q_proj.lora_A` (L global), tensor:
exactly PEFT's for that HF module (lora_A (r, in), lora_B (out, r), magnitude = lora_magnitude_vector
(out,)), in HF row/column order. Ranks hold slices: B and magnitude split by rows at column-parallel
layers, A split by columns at row-parallel ones (the way megatron-core splits the base weight).
"""
import torch
from megatron.core import parallel_state

from megaswift.config import ConfigError, TunerConfig
from megaswift.tuners.apply import global_module_name, linear_adapters
from megaswift.tuners.targets import fused_linears, select_targets

PEFT_PREFIX = "base_model.model."
PEFT_LEAVES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}


def _split_dim(adapter, leaf: str) -> int | None:
    if adapter.parallel == "column":
        return 0 if leaf in ("lora_B", "magnitude") else None
    return 1 if leaf == "lora_A" else None


def _adapter_tensors(chunks: list):
    """(global name, this rank's tensor, TP split dim or None, adapter) for every adapter tensor."""
    for chunk, local, adapter in linear_adapters(chunks):
        base = global_module_name(_unwrapped(chunk), local.removeprefix("module."))
        for part_name, part in adapter.parts():
            for leaf in ("lora_A", "lora_B", "magnitude"):
                tensor = getattr(part, leaf)
                if tensor is not None:
                    yield f"{base}.{part_name}.{leaf}", tensor, _split_dim(adapter, leaf), adapter


def _unwrapped(chunk):
    return chunk.module if hasattr(chunk, "module") and hasattr(chunk.module, "decoder") else chunk


@torch.no_grad()
def adapter_state(chunks: list) -> dict[str, torch.Tensor]:
    """This rank's adapter tensors as global (TP-gathered) tensors; a pipeline stage returns its own layers."""
    out = {}
    for name, tensor, dim, adapter in _adapter_tensors(chunks):
        if dim is not None and adapter.tp_size > 1:
            pieces = [torch.empty_like(tensor) for _ in range(adapter.tp_size)]
            torch.distributed.all_gather(pieces, tensor.contiguous(), group=adapter.tp_group)
            tensor = torch.cat(pieces, dim=dim)
        out[name] = tensor.detach().clone()
    return out


@torch.no_grad()
def load_adapter_state(chunks: list, tensors: dict[str, torch.Tensor]) -> None:
    """Copies global adapter tensors into this rank's slices. Every adapter tensor of these chunks must be
    given, with its global shape; tensors of layers on other pipeline stages are ignored."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for name, tensor, dim, adapter in _adapter_tensors(chunks):
        if name not in tensors:
            raise ConfigError(f"adapter tensor {name} is missing from the adapter being loaded "
                              f"(it has {len(tensors)} tensors, e.g. {sorted(tensors)[:3]})")
        value = tensors[name]
        expected = list(tensor.shape)
        if dim is not None:
            expected[dim] *= adapter.tp_size
        if list(value.shape) != expected:
            raise ConfigError(f"adapter tensor {name}: shape {list(value.shape)}, expected {expected} "
                              f"(does the adapter's rank or base model differ from this model's?)")
        if dim is not None and adapter.tp_size > 1:
            value = value.chunk(adapter.tp_size, dim=dim)[tp_rank]
        tensor.copy_(value)


def _hf_module_index(hf: dict) -> dict[str, str]:
    """HF module path -> the global adapter part name prefix (`...linear_qkv.adapter.q_proj`)."""
    return {module: f"{linear.mcore}.adapter.{part}" for linear in fused_linears(hf) if not linear.routed_expert
            for module, part in zip(linear.hf_modules, linear.parts)}


def peft_to_adapter(peft_state: dict, hf: dict) -> dict[str, torch.Tensor]:
    """PEFT adapter file tensors -> megaswift's global adapter names (values unchanged)."""
    index = _hf_module_index(hf)
    out = {}
    for key, value in peft_state.items():
        body = key.removeprefix(PEFT_PREFIX)
        leaf = next((ours for ours, theirs in PEFT_LEAVES.items() if body.endswith("." + theirs)), None)
        module = body[: -len(PEFT_LEAVES[leaf]) - 1] if leaf else None
        if module not in index:
            raise ConfigError(f"PEFT adapter key {key!r} is not a LoRA/DoRA tensor of a module megaswift adapts; "
                              f"supported modules look like {next(iter(index), '?')} (routed experts and "
                              "modules_to_save tensors are not adapter tensors)")
        out[f"{index[module]}.{leaf}"] = value
    return out


def adapter_to_peft(tensors: dict[str, torch.Tensor], hf: dict) -> dict[str, torch.Tensor]:
    """megaswift's global adapter names -> PEFT adapter file keys (values unchanged)."""
    reverse = {ours: module for module, ours in _hf_module_index(hf).items()}
    out = {}
    for name, value in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix not in reverse or leaf not in PEFT_LEAVES:
            raise ConfigError(f"{name!r} is not an adapter tensor name of this model")
        out[f"{PEFT_PREFIX}{reverse[prefix]}.{PEFT_LEAVES[leaf]}"] = value
    return out


def peft_target_modules(hf: dict, targets: str) -> list[str]:
    """PEFT's target_modules for a run's targets: module paths within a layer (unambiguous in PEFT's
    suffix match), e.g. self_attn.q_proj, mlp.shared_expert.gate_proj."""
    modules = set()
    for linear, parts in select_targets(hf, targets).values():
        for module, part in zip(linear.hf_modules, linear.parts):
            if part in parts:
                modules.add(".".join(module.split(".")[3:]))
    return sorted(modules)


def peft_adapter_config(tuner: TunerConfig, hf: dict, base_name_or_path: str) -> dict:
    """adapter_config.json for a run's adapter."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name_or_path,
        "r": tuner.rank, "lora_alpha": tuner.alpha, "lora_dropout": tuner.dropout, "use_rslora": tuner.rslora,
        "use_dora": tuner.type == "dora", "target_modules": peft_target_modules(hf, tuner.targets),
        "modules_to_save": list(tuner.modules_to_save) or None, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True,
    }
