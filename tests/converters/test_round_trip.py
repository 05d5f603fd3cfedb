"""HF -> mcore -> HF for every family: bit-exact for every tensor in the source dtype (bf16, fp32);
the verification gate's logit check (megatron-core at TP=1 vs transformers, fp32) passes both ways;
a bf16 checkpoint run in bf16 by megatron-core gives transformers' logits within bf16 rounding; the HF
output loads with AutoModelForCausalLM / AutoTokenizer and gives the source model's logits.

Every tiny preset has a vocabulary that megatron pads (1030 -> 1152 etc.), so all of this meets padding."""
import json

import pytest
import torch
from safetensors.torch import load_file

from converters import mcore2hf
from converters.verify import LOGITS_MAX_ABS_DIFF, fixed_tokens
from tests.converters.tiny_models import FAMILY_PRESETS, MOE_FAMILIES, hf_logits, mcore_logits

FAMILIES = list(FAMILY_PRESETS)


def load_sharded(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert files == {p.name for p in folder.glob("*.safetensors")}, "index and files disagree"
    tensors = {}
    for file in files:
        part = load_file(folder / file)
        assert all(index["weight_map"][k] == file for k in part), f"{file}: holds tensors the index puts elsewhere"
        tensors.update(part)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    return tensors


# megatron-core computing in bf16 vs transformers computing in fp32 on the same bf16 weights (exact
# arithmetic for those weights): bf16 keeps 8 significant bits (relative rounding 2^-9), compounded over
# the ~40 rounded ops of 4 layers on logits of magnitude ~4 gives a few 1e-2 per logit (measured: max
# 0.036-0.061, mean 0.006-0.008 for every family). transformers' own bf16 forward is 0.04-0.07 away for
# dense families and up to 0.7 for MoE ones, so the fp32 run of the same weights is the reference.
# An MoE router is discontinuous: where two experts' scores lie within bf16 rounding of each other, a
# bf16 run may pick the other expert, moving that position's logits by more (qwen3-moe: 1 position of
# 32, by 0.37); one such position is allowed for MoE families. A wrong, swapped or twice-rounded tensor
# moves every position, and the mean by O(0.1-1).
BF16_LOGITS_MAX_ABS_DIFF = 0.1
BF16_LOGITS_MEAN_ABS_DIFF = 0.02


def assert_verified(report: dict, folder):
    assert report["passed"] and report["logits"]["max_abs_diff"] <= LOGITS_MAX_ABS_DIFF, report
    assert json.loads((folder / "verification.json").read_text()) == report


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact(family, dtype, tmp_path, hf_model_dirs, converted_dirs):
    source_dir = hf_model_dirs(family, dtype)
    mcore_dir, report = converted_dirs(family, dtype)
    if dtype == "fp32":
        assert_verified(report, mcore_dir)
    else:
        hf = json.loads((source_dir / "config.json").read_text())
        tokens = fixed_tokens(hf["vocab_size"])
        diff = (mcore_logits(hf, mcore_dir / "iter_0000000", tokens, torch.bfloat16)
                - hf_logits(source_dir, tokens)).abs()[0]
        beyond = int((diff.amax(-1) > BF16_LOGITS_MAX_ABS_DIFF).sum())
        assert diff.mean() <= BF16_LOGITS_MEAN_ABS_DIFF, f"{family} bf16: mean |logits diff| {diff.mean()}"
        assert beyond <= (1 if family in MOE_FAMILIES else 0), \
            f"{family} bf16: {beyond} positions with |logits diff| > {BF16_LOGITS_MAX_ABS_DIFF}: {diff.amax(-1)}"
    assert (mcore_dir / "latest").read_text().strip() == "0"

    back = tmp_path / "hf"
    report = mcore2hf(mcore_dir, back, max_shard_size="200KB", verify=dtype == "fp32", progress=False)
    if dtype == "fp32":
        assert_verified(report, back)
    source, converted = load_file(source_dir / "model.safetensors"), load_sharded(back)
    assert len(list(back.glob("*.safetensors"))) > 1, "expected several shards at --max-shard-size 200KB"
    assert converted.keys() == source.keys()
    wrong = [k for k in source if source[k].dtype != converted[k].dtype or not torch.equal(source[k], converted[k])]
    assert not wrong, f"tensors not bit-exact: {wrong}"


@pytest.mark.parametrize("family", ["llama3-tied", "qwen2-moe"])
def test_hf_output_loads_with_transformers(family, tmp_path, hf_model_dirs, converted_dirs):
    from transformers import AutoTokenizer

    source_dir = hf_model_dirs(family, "fp32")
    back = tmp_path / "hf"
    mcore2hf(converted_dirs(family, "fp32")[0], back, verify=False, progress=False)
    tokens = fixed_tokens(256)
    assert torch.equal(hf_logits(back, tokens), hf_logits(source_dir, tokens))
    source_tok, back_tok = AutoTokenizer.from_pretrained(source_dir), AutoTokenizer.from_pretrained(back)
    messages = [{"role": "user", "content": "def f(x): return x"}]
    rendered = back_tok.apply_chat_template(messages, tokenize=False)
    assert rendered == source_tok.apply_chat_template(messages, tokenize=False) and "def f(x)" in rendered
    assert back_tok("class A: pass")["input_ids"] == source_tok("class A: pass")["input_ids"]
    assert json.loads((back / "generation_config.json").read_text()) == \
        json.loads((source_dir / "generation_config.json").read_text())


def test_dtype_flag_casts_and_verifies(tmp_path, hf_model_dirs):
    from converters import hf2mcore
    from converters.mcore_reader import McoreCheckpointReader
    out = tmp_path / "bf16"
    report = hf2mcore(hf_model_dirs("qwen2", "fp32"), out, dtype="bf16", verify=True, progress=False)
    assert_verified(report, out)
    md = McoreCheckpointReader(out / "iter_0000000").tensor_metadata("decoder.layers.self_attention.linear_qkv.bias")
    assert md.properties.dtype == torch.bfloat16
