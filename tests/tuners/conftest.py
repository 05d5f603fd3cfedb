"""Session fixtures: tiny fp32 HF models (2 layers) and their hf2mcore conversions, built once."""
import pytest
import torch

from tests.converters.tiny_models import FAMILY_PRESETS, save_tiny_hf_model
from tests.tuners.support import TINY_OVERRIDES, VARIANTS


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """family (or a name in support.VARIANTS) -> (HF folder, converted checkpoint's iter_0000000 folder,
    hf config dict)."""
    from converters import hf2mcore
    from megaswift.checkpointing.layout import read_meta
    cache = {}

    def get(family: str):
        if family not in cache:
            root = tmp_path_factory.mktemp(f"lora-{family}")
            preset_family, overrides = VARIANTS.get(family, (family, {}))
            save_tiny_hf_model(FAMILY_PRESETS[preset_family], root / "hf", torch.float32, None,
                               overrides={**TINY_OVERRIDES, **overrides})
            hf2mcore(root / "hf", root / "ckpt", verify=False, progress=False)
            ckpt = root / "ckpt" / "iter_0000000"
            cache[family] = (root / "hf", ckpt, read_meta(ckpt)["hf_config"])
        return cache[family]
    return get
