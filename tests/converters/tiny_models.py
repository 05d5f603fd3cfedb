"""Tiny random HF models of every supported family, saved like hub checkpoints (config, safetensors,
tokenizer, generation config), built from the presets in megaswift/models/presets.py."""
from pathlib import Path

import torch

# One tiny preset per family, plus untied Llama (the Llama 3 preset has tied embeddings).
FAMILY_PRESETS = {
    "llama3-tied": "tiny-llama3", "llama": "tiny-llama", "mistral": "tiny-mistral", "qwen2": "tiny-qwen2",
    "qwen3": "tiny-qwen3", "mixtral": "tiny-mixtral", "qwen2-moe": "tiny-qwen2-moe", "qwen3-moe": "tiny-qwen3-moe",
}
MOE_FAMILIES = ("mixtral", "qwen2-moe", "qwen3-moe")


def hf_config_object(preset: str):
    from transformers import AutoConfig

    from megaswift.models import preset_hf_config
    hf = preset_hf_config(preset)
    return AutoConfig.for_model(hf.pop("model_type"), **hf)


def save_tiny_hf_model(preset: str, folder: Path, dtype: torch.dtype, tokenizer_dir: Path | None, seed: int = 0):
    """Every tensor random (norms around 1), so a swapped or dropped tensor changes the logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config_object(preset), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.to(dtype).save_pretrained(folder)
    if tokenizer_dir is not None:
        for file in Path(tokenizer_dir).iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
    return folder


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits
