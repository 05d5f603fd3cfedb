"""apply_tuner: put adapters on the targeted linear layers of this rank's model chunks and freeze the rest.

Frozen parameters (requires_grad=False) get no gradient buffer from megatron-core's DDP and no optimizer
state, which is where LoRA's memory saving comes from. `modules_to_save` (embed_tokens, lm_head) stay
trainable in full.
"""
import zlib
from contextlib import contextmanager

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megaswift.config import ConfigError, TunerConfig
from megaswift.models.families import family_of, hf_view
from megaswift.models.families.rules import dims_of
from megaswift.models.families.transforms import Dims
from megaswift.tuners.lora_layer import (AdaptedColumnParallelLinear, AdaptedRowParallelLinear, LinearAdapter,
                                         lora_scaling)
from megaswift.tuners.targets import LINEAR_NAMES, check_row_move, select_targets

TUNER_TYPES = ("full", "lora", "dora")
ADAPTER = ".adapter."


def check_tuner_config(tuner: TunerConfig) -> None:
    if tuner.type not in TUNER_TYPES:
        raise ConfigError(f"tuner.type={tuner.type!r} is not allowed; choose one of {list(TUNER_TYPES)}")
    if tuner.type == "full":
        return
    if tuner.rank < 1:
        raise ConfigError(f"tuner.rank must be >= 1, found {tuner.rank}")
    if not 0.0 <= tuner.dropout < 1.0:
        raise ConfigError(f"tuner.dropout must be in [0, 1), found {tuner.dropout}")


def check_tuner_settings(tuner: TunerConfig, hf: dict) -> None:
    """What can be checked from the settings and the HF config alone (type, rank, targets, modules_to_save),
    so the Trainer refuses bad tuner flags before any process starts (`megaswift launch` included)."""
    check_tuner_config(tuner)
    if tuner.type != "full":
        select_targets(hf, tuner.targets)
        modules_to_save_params(hf, tuner.modules_to_save)


def modules_to_save_params(hf: dict, modules_to_save: list[str]) -> set[str]:
    """megatron-core parameter names trained in full, from the family's rules for the HF modules named
    (embed_tokens -> embedding.word_embeddings.weight, lm_head -> output_layer.weight)."""
    family = family_of(hf)
    view = hf_view(hf)
    ends = [m for m in family.tensor_mappings(view) if ".layers." not in m.mcore]
    by_module = {m.hf[0].rsplit(".", 2)[-2]: m.mcore for m in ends if len(m.hf) == 1}
    names = set()
    for module in modules_to_save:
        if module == "lm_head" and view.tied_embeddings:
            raise ConfigError("tuner.modules_to_save: lm_head is tied to embed_tokens in this model "
                              "(tie_word_embeddings); give embed_tokens, which trains the shared matrix")
        if module not in ("embed_tokens", "lm_head") or module not in by_module:
            raise ConfigError(f"tuner.modules_to_save: {module!r} is not supported; valid: "
                              f"{sorted(k for k in by_module if k in ('embed_tokens', 'lm_head'))}")
        names.add(by_module[module])
    if view.tied_embeddings and names:
        names.add("output_layer.weight")  # the last stage's copy of the tied matrix trains with it
    return names


def is_adapter_param(name: str, modules_to_save: set[str] | frozenset = frozenset()) -> bool:
    """True for adapter parameters (and for the `modules_to_save_params` names given): what a LoRA
    checkpoint holds. Works on names with or without a DDP `module.` prefix."""
    bare = name[len("module."):] if name.startswith("module.") else name
    return ADAPTER in f".{bare}" or bare in modules_to_save


def global_module_name(chunk, local_name: str) -> str:
    """`decoder.layers.{local}.x` -> `decoder.layers.{global}.x` (megatron's layer_number is global, 1-based)."""
    parts = local_name.split(".")
    if parts[:2] == ["decoder", "layers"] and len(parts) > 2:
        layer = chunk.decoder.layers[int(parts[2])]
        parts[2] = str(layer.layer_number - 1)
    return ".".join(parts)


def _init_seed(name: str) -> int:
    # Per adapter tensor, independent of the parallel layout: every rank builds the same global
    # tensor and keeps its slice, so TP/PP layouts start from identical adapters.
    return zlib.crc32(name.encode())


def _kaiming_uniform_global(shape: tuple[int, int], name: str) -> torch.Tensor:
    """PEFT's default A init (kaiming_uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in)))."""
    bound = 1.0 / shape[1] ** 0.5
    generator = torch.Generator().manual_seed(_init_seed(name))
    return torch.rand(shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound


def _adapt(module, global_name: str, linear, parts, tuner: TunerConfig, dims: Dims, tp: int, tp_rank: int):
    column = isinstance(module, ColumnParallelLinear)
    out_local, in_local = module.weight.shape
    local_dims = Dims(dims.num_heads // tp, dims.num_query_groups // tp, dims.head_dim, dims.vocab_size)
    check_row_move(linear, local_dims, (out_local, in_local))
    meta = torch.empty((out_local, in_local), device="meta")
    part_rows = {name: t.shape[0] for name, t in zip(linear.parts, linear.transform.to_hf(meta, local_dims))} \
        if len(linear.parts) > 1 else {linear.parts[0]: out_local}
    adapter = LinearAdapter(
        "column" if column else "row", part_rows, parts, in_local, linear.transform, local_dims, tuner.rank,
        lora_scaling(tuner.alpha, tuner.rank, tuner.rslora), tuner.dropout, tuner.type == "dora",
        module.sequence_parallel and tp > 1, tp, module.tp_group, module.weight.dtype).to(module.weight.device)
    with torch.no_grad():
        for name, part in adapter.parts():
            a_global = _kaiming_uniform_global((tuner.rank, in_local * (1 if column else tp)),
                                               f"{global_name}.adapter.{name}.lora_A")
            part.lora_A.copy_(a_global if column else a_global.chunk(tp, dim=1)[tp_rank])
    module.__class__ = AdaptedColumnParallelLinear if column else AdaptedRowParallelLinear
    module.add_module("adapter", adapter)
    if adapter.dora:
        adapter.reset_magnitudes(module.weight)


def apply_tuner(chunks: list, tuner: TunerConfig, hf: dict) -> list:
    """Wraps the targeted linear layers of each chunk in place and freezes every other parameter except
    `modules_to_save`; a no-op for tuner.type=full."""
    check_tuner_config(tuner)
    if tuner.type == "full":
        return chunks
    targets = select_targets(hf, tuner.targets)
    trained_in_full = modules_to_save_params(hf, tuner.modules_to_save)
    dims = dims_of(hf_view(hf))
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for chunk in chunks:
        for local_name, module in list(chunk.named_modules()):
            if local_name.rsplit(".", 1)[-1] not in LINEAR_NAMES:
                continue
            global_name = global_module_name(chunk, local_name)
            if global_name not in targets:
                continue
            if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                raise ConfigError(
                    f"tuner.type={tuner.type}: {global_name} is a {type(module).__module__}.{type(module).__name__}; "
                    "adapters are supported on megatron-core's local layers only (Transformer Engine fuses the "
                    "layernorm into linear_qkv); run with --model.layer_spec local")
            linear, parts = targets[global_name]
            _adapt(module, global_name, linear, parts, tuner, dims, tp, tp_rank)
        for name, param in chunk.named_parameters():
            param.requires_grad = is_adapter_param(name, trained_in_full)
    return chunks


def linear_adapters(chunks: list):
    """(chunk, local module name, LinearAdapter) for every adapter in these chunks (DDP-wrapped or not)."""
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if isinstance(module, LinearAdapter):
                yield chunk, name, module


@torch.no_grad()
def init_dora_magnitudes(chunks: list) -> None:
    """DoRA's magnitudes from the base weights now in the model: call after loading the base checkpoint
    when no adapter is loaded (apply_tuner computed them from the weights it saw, the random init)."""
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, (AdaptedColumnParallelLinear, AdaptedRowParallelLinear)) and module.adapter.dora:
                module.adapter.reset_magnitudes(module.weight)


@contextmanager
def adapters_disabled(chunks: list):
    """The forward runs as the base model inside (DPO's reference model)."""
    adapters = [adapter for _, _, adapter in linear_adapters(chunks)]
    states = [a.enabled for a in adapters]
    for adapter in adapters:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter, state in zip(adapters, states):
            adapter.enabled = state
