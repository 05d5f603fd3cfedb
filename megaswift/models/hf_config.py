"""Where a model's HF config comes from: a preset, or a config.json on disk, plus overrides."""
import json
from pathlib import Path

from megaswift.config import ConfigError, ModelConfig
from megaswift.models.families import family_of, preset_hf_config


def load_hf_config(path: str | Path) -> dict:
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"HF config not found: {file} (give a config.json or a folder holding one)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: invalid JSON: {e}") from e
    family_of(config, where=str(file))
    return config


def resolve_hf_config(model: ModelConfig) -> dict:
    if model.hf_config:
        config = load_hf_config(model.hf_config)
    elif model.preset:
        try:
            config = preset_hf_config(model.preset)
        except KeyError as e:
            raise ConfigError(f"model.preset: {e.args[0]}") from None
    else:
        raise ConfigError("model: set model.preset or model.hf_config")
    config.update(model.overrides or {})
    family_of(config, where="model config")
    return config
