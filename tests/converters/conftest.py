"""Session fixtures: tiny HF models of every family (fp32 and bf16) and their hf2mcore conversions."""
import pytest
import torch

from tests.converters.tiny_models import FAMILY_PRESETS, save_tiny_hf_model


@pytest.fixture(scope="session")
def hf_model_dirs(tmp_path_factory, tiny_tokenizer_dir):
    """(family, dtype name) -> HF folder; built lazily, once per session."""
    cache = {}

    def get(family: str, dtype: str = "fp32"):
        if (family, dtype) not in cache:
            folder = tmp_path_factory.mktemp(f"hf-{family}-{dtype}")
            torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
            cache[family, dtype] = save_tiny_hf_model(FAMILY_PRESETS[family], folder, torch_dtype, tiny_tokenizer_dir)
        return cache[family, dtype]
    return get


@pytest.fixture(scope="session")
def converted_dirs(tmp_path_factory, hf_model_dirs):
    """(family, dtype name) -> hf2mcore output with its verification report: (folder, report)."""
    from converters import hf2mcore
    cache = {}

    def get(family: str, dtype: str = "fp32"):
        if (family, dtype) not in cache:
            out = tmp_path_factory.mktemp(f"mcore-{family}-{dtype}") / "ckpt"
            report = hf2mcore(hf_model_dirs(family, dtype), out, verify=dtype == "fp32", progress=False)
            cache[family, dtype] = (out, report)
        return cache[family, dtype]
    return get
