"""Converted checkpoints load at TP=2, PP=2, PP=2 x VPP=2 and EP=2 (torchrun, 2 processes, megatron-core's own
dist_checkpointing.load) and give transformers' logits (fp32, <= 1e-4); checkpoints re-saved at those
layouts, as training saves them, convert back to HF bit-exactly."""
import json

import pytest
import torch
from safetensors.torch import load_file

from converters import mcore2hf
from converters.verify import LOGITS_MAX_ABS_DIFF, fixed_tokens
from tests.converters.tiny_models import FAMILY_PRESETS, MOE_FAMILIES, hf_logits
from tests.torchrun import REPO, run_torchrun

LAYOUTS = {  # layout -> (families checked, families re-saved at that layout and converted back)
    # DeepSeek-V3: MLA's latent projections split by TP; GLM-4.5: its first (dense) layer on one stage only,
    # per-layer keys (moe_layer_freq); both: the routers' expert bias, experts split by EP
    "tp2": (dict(tp=2), list(FAMILY_PRESETS), ["llama3-tied", "qwen2-moe", "deepseek-v3"]),
    "pp2": (dict(pp=2), list(FAMILY_PRESETS), ["llama3-tied", "qwen3", "glm4-moe"]),
    # interleaved: each rank holds two chunks of one layer each (tiny models have 4 layers)
    "pp2-vpp2": (dict(pp=2, vpp=2), ["llama3-tied", "qwen2", "mixtral"], ["llama3-tied"]),
    "ep2": (dict(ep=2), list(MOE_FAMILIES), ["mixtral", "deepseek-v3"]),
}


def load_hf_tensors(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for file in set(index.values()):
        tensors.update(load_file(folder / file))
    return tensors


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_converted_checkpoint_at_parallel_layout(layout, tmp_path, hf_model_dirs, converted_dirs):
    sizes, families, resaved = LAYOUTS[layout]
    cases = []
    for family in families:
        hf_dir = hf_model_dirs(family, "fp32")
        tokens = fixed_tokens(256)
        torch.save(tokens, tmp_path / f"{family}-tokens.pt")
        torch.save(hf_logits(hf_dir, tokens), tmp_path / f"{family}-logits.pt")
        cases.append({"name": family, "ckpt": str(converted_dirs(family)[0]),
                      "tokens": str(tmp_path / f"{family}-tokens.pt"),
                      "expected_logits": str(tmp_path / f"{family}-logits.pt"),
                      "save_to": str(tmp_path / f"resaved-{family}") if family in resaved else None})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    flags = [f"--{k}={v}" for k, v in sizes.items()]
    run_torchrun([REPO / "tests/converters/layout_worker.py", tmp_path / "cases.json", tmp_path, *flags], timeout=300)

    diffs = {}
    for rank in (0, 1):
        for family, result in json.loads((tmp_path / f"rank{rank}.json").read_text()).items():
            if "max_abs_diff" in result:
                diffs.setdefault(family, []).append(result["max_abs_diff"])
    assert set(diffs) == set(families), f"no last-stage logits for {set(families) - set(diffs)}"
    worst = {family: max(values) for family, values in diffs.items()}
    assert all(d <= LOGITS_MAX_ABS_DIFF for d in worst.values()), worst

    for family in resaved:
        back = tmp_path / f"back-{family}"
        report = mcore2hf(tmp_path / f"resaved-{family}", back, verify=False, progress=False)
        assert report == {}
        source = load_file(hf_model_dirs(family, "fp32") / "model.safetensors")
        converted = load_hf_tensors(back)
        assert converted.keys() == source.keys()
        unequal = [k for k in source if not torch.equal(source[k], converted[k])]
        assert not unequal, f"{family} saved at {layout}: tensors changed: {unequal}"
