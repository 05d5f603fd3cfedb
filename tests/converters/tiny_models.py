"""Tiny random HF models of every registered family, saved like hub checkpoints (config, safetensors,
tokenizer, generation config), built from each family's tiny preset (megaswift/models/families/)."""
from pathlib import Path

import torch

from megaswift.models.families import REGISTERED, hf_view, preset_hf_config

# Each family's tiny preset, plus Llama 3 with tied embeddings (the Llama family's tiny preset is untied).
FAMILY_PRESETS = {"llama3-tied": "tiny-llama3", **{family.name: family.tiny_preset for family in REGISTERED}}
MOE_FAMILIES = tuple(name for name, preset in FAMILY_PRESETS.items() if hf_view(preset_hf_config(preset)).moe)


def hf_config_object(preset: str, overrides: dict | None = None):
    from transformers import AutoConfig

    hf = {**preset_hf_config(preset), **(overrides or {})}
    return AutoConfig.for_model(hf.pop("model_type"), **hf)


def save_tiny_hf_model(preset: str, folder: Path, dtype: torch.dtype, tokenizer_dir: Path | None, seed: int = 0,
                       overrides: dict | None = None):
    """Every tensor random (norms around 1), so a swapped or dropped tensor changes the logits; saved
    float buffers too (the routers' `e_score_correction_bias`, zeros when initialised).
    `overrides`: HF config fields to change (e.g. fewer layers, another vocab size)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config_object(preset, overrides), dtype=torch.float32)
    with torch.no_grad():
        saved = model.state_dict().keys()
        tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n in saved)]
        for name, p in tensors:
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.to(dtype).save_pretrained(folder)
    if tokenizer_dir is not None:
        for file in Path(tokenizer_dir).iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
    return folder


def lazily_converted(tmp_path_factory, tokenizer_dir: Path, models: dict[str, tuple[str, dict]], label: str):
    """name -> (fp32 HF folder saved by transformers, its hf2mcore conversion), for the presets and overrides
    `models` names; each built once, on first use (a fixture returns this)."""
    from converters import hf2mcore
    built = {}

    def get(name: str):
        if name not in built:
            preset, overrides = models[name]
            root = tmp_path_factory.mktemp(f"{label}-{name}")
            hf_dir = save_tiny_hf_model(preset, root / "hf", torch.float32, tokenizer_dir, overrides=overrides)
            hf2mcore(hf_dir, root / "mcore", verify=False, progress=False)
            built[name] = hf_dir, root / "mcore"
        return built[name]
    return get


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


def mcore_logits(hf: dict, iteration_dir: Path, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """megatron-core's logits (true vocabulary, as fp32) of a converted checkpoint, the model built and run
    in `dtype` at TP=1 (one process)."""
    from megatron.core import dist_checkpointing

    from converters.process_group import single_process_model_parallel
    from megaswift.config import ParallelConfig
    from megaswift.models import hf_to_transformer_config
    from megaswift.models.builder import build_model_chunks
    with single_process_model_parallel():
        config = hf_to_transformer_config(hf, ParallelConfig(), params_dtype=dtype)
        config.perform_initialization = False
        (model,) = build_model_chunks(hf, config, "local")
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(iteration_dir))
        model.load_state_dict(loaded["model"], strict=True)
        model.eval()
        with torch.no_grad():
            logits = model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0), None)
    return logits[..., : hf["vocab_size"]].float()
