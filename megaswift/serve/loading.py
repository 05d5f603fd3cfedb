"""Find and load the model to serve: an exported HF folder, or a megaswift checkpoint exported on the fly
(converters.mcore2hf into a cache folder, reused while the checkpoint is unchanged), plus PEFT LoRA
adapters loaded side by side on one base model (never merged, so each request picks its adapter)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from megaswift.checkpointing.foreign import is_megaswift_checkpoint
from megaswift.checkpointing.layout import LATEST_FILE, META_FILE, CheckpointError, resolve_checkpoint

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch (adapter_names)


class ModelLoadError(ValueError):
    """The model or an adapter cannot be found or loaded; says what was expected and what to give."""


def default_export_cache() -> Path:
    return Path(os.environ.get("MEGASWIFT_EXPORT_CACHE", Path.home() / ".cache" / "megaswift" / "exported"))


def resolve_model_dir(model: str | Path, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The HF folder to load: `model` itself, or the on-the-fly export of a megaswift checkpoint. The cache
    key is the checkpoint folder and its megaswift.json's modification time, so a resumed run that wrote a
    newer `latest` gets a fresh export."""
    path = Path(model)
    if is_megaswift_checkpoint(path):
        try:
            ckpt = resolve_checkpoint(path).resolve()
        except CheckpointError as err:
            raise ModelLoadError(str(err)) from None
        stamp = f"{ckpt}:{(ckpt / META_FILE).stat().st_mtime_ns}"
        out = Path(cache_dir or default_export_cache()) / f"{ckpt.parent.name}-{ckpt.name}-" \
                                                          f"{hashlib.sha256(stamp.encode()).hexdigest()[:12]}"
        if not (out / "config.json").is_file():
            from converters import mcore2hf
            print(f"exporting megaswift checkpoint {ckpt} to {out} (cached for later runs)", flush=True)
            from megaswift.checkpointing.adapter import is_adapter_checkpoint
            from megaswift.checkpointing.layout import read_meta
            # writes to a temporary folder, renamed when done; a LoRA/DoRA run's checkpoint is served merged
            mcore2hf(ckpt, out, verify=False, progress=progress, merge=is_adapter_checkpoint(read_meta(ckpt)))
        return out
    if (path / "config.json").is_file():
        return path
    raise ModelLoadError(f"--model {model}: expected an HF model folder (with config.json, e.g. from `megaswift "
                         f"convert mcore2hf`) or a megaswift checkpoint (with {META_FILE} or {LATEST_FILE}); "
                         f"found {'no such folder' if not path.exists() else 'neither'}")


def parse_adapters(items: list[str] | None) -> dict[str, str]:
    """`name=dir` items -> {name: dir}; a bare `dir` is named after its folder."""
    adapters = {}
    for item in items or []:
        name, sep, folder = item.partition("=")
        name, folder = (name, folder) if sep else (Path(item).name, item)
        if not name or not folder:
            raise ModelLoadError(f"--adapters {item!r}: expected name=adapter_dir")
        if name in adapters or name == BASE_ADAPTER:
            raise ModelLoadError(f"--adapters: the name {name!r} is used twice or is reserved; give each its own name")
        if not (Path(folder) / "adapter_config.json").is_file():
            raise ModelLoadError(f"--adapters {item}: {folder} has no adapter_config.json; expected a PEFT adapter "
                                 f"folder (PeftModel.save_pretrained)")
        adapters[name] = folder
    return adapters


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(folder: str | Path):
    """The tokenizer exactly as training used it. `megaswift sft` loads the checkpoint's hf_assets/, which
    holds no config.json, so AutoTokenizer follows tokenizer_config.json there. In an exported folder,
    config.json's model_type makes AutoTokenizer (transformers 5) prefer the family's tokenizer class, which
    rebuilds the pre-tokenizer: for a tokenizer saved as the generic class (the tiny tokenizer, custom ones)
    the tokens would differ from training's. So the class saved in tokenizer_config.json decides."""
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    config_file = Path(folder) / "tokenizer_config.json"
    saved_class = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    if saved_class in GENERIC_TOKENIZER_CLASSES:
        return TokenizersBackend.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@dataclass
class LoadedModel:
    model: object                 # transformers PreTrainedModel, or peft PeftModel holding every adapter
    tokenizer: object
    name: str                     # the base model's name in the API
    adapters: tuple[str, ...]     # adapter names (the API's other model names)
    context_length: int


def load_model(model_dir: str | Path, adapters: dict[str, str] | None = None, name: str | None = None,
               dtype: str = "auto", device: str | None = None) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    tokenizer = load_tokenizer(model_dir)
    tokenizer.padding_side = "left"  # batched generation continues every row from its last prompt token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    adapters = adapters or {}
    if adapters:
        from peft import PeftModel
        (first, first_dir), *rest = adapters.items()
        model = PeftModel.from_pretrained(model, first_dir, adapter_name=first)
        for adapter, folder in rest:
            model.load_adapter(folder, adapter_name=adapter)
    model.eval()
    config = model.config if not adapters else model.get_base_model().config
    context = getattr(config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", 2048)
    return LoadedModel(model, tokenizer, name or model_dir.resolve().name, tuple(adapters), int(context))
