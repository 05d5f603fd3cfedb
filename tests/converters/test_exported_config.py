"""mcore2hf's config.json reads the same under transformers 4.x and 5: transformers 5 saves the source with
`dtype` and one `rope_parameters` dict, while transformers 4.x (and vLLM running on it) reads `torch_dtype`,
top-level `rope_theta`, `rope_scaling` and `partial_rotary_factor`. transformers 4.x is not installed here,
so its reading is stood in for by transformers 5 reading a copy that holds only the 4.x spellings (its
backward-compatible path): those alone must give the source model's RoPE and dtype."""
import json

import pytest
import torch

from converters import mcore2hf
from megaswift.serve.vllm_checks import model_folder_problems

# Non-default RoPE types (Llama 3's, DeepSeek's YaRN), GLM's partial rotary factor, and a default one.
FAMILIES = ["llama3-tied", "deepseek-v3", "glm4-moe", "qwen3"]
TRANSFORMERS5_ONLY = ("dtype", "rope_parameters")


def _rope_and_dtype(folder):
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(folder)
    return config.rope_parameters, config.dtype


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_config_has_both_spellings(family, tmp_path, hf_model_dirs, converted_dirs):
    from transformers import AutoModelForCausalLM

    source_dir = hf_model_dirs(family, "bf16")
    source = json.loads((source_dir / "config.json").read_text())
    assert "torch_dtype" not in source and "rope_theta" not in source, "the source is not transformers-5 style"
    back = tmp_path / "hf"
    mcore2hf(converted_dirs(family, "bf16")[0], back, verify=False, progress=False)
    config = json.loads((back / "config.json").read_text())

    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    rope = config["rope_parameters"]
    assert config["rope_theta"] == rope["rope_theta"]
    assert config.get("partial_rotary_factor") == rope.get("partial_rotary_factor")
    if rope["rope_type"] == "default":
        assert "rope_scaling" not in config
    else:  # what rope_parameters says beyond the top-level fields
        assert config["rope_scaling"] == {k: v for k, v in rope.items()
                                          if k not in ("rope_theta", "partial_rotary_factor")}
        assert config["rope_scaling"]["rope_type"] == rope["rope_type"] and "factor" in config["rope_scaling"]

    # transformers 5 reads the same RoPE and dtype from the source, the export and the 4.x spellings alone.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in TRANSFORMERS5_ONLY}))
    expected = _rope_and_dtype(source_dir)
    assert expected[1] == torch.bfloat16
    assert _rope_and_dtype(back) == expected
    assert _rope_and_dtype(legacy) == expected

    # The model it builds rotates by the same frequencies and keeps the stored dtype.
    models = [AutoModelForCausalLM.from_pretrained(folder, dtype="auto") for folder in (source_dir, back)]
    assert models[1].dtype == torch.bfloat16
    assert torch.equal(models[0].model.rotary_emb.inv_freq, models[1].model.rotary_emb.inv_freq)
    assert models[0].model.rotary_emb.attention_scaling == models[1].model.rotary_emb.attention_scaling
    assert model_folder_problems(back) == []
