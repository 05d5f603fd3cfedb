"""What only the newer families have, against transformers' own models: dense layers inside MoE models
(megatron-core's moe_layer_freq), DeepSeek-V3's multi-latent attention without a q bottleneck and its
multi-token-prediction tensors, GLM-4.5-Air's variant, YaRN of the released DeepSeek-V3 / Kimi-K2 configs,
and the settings megatron-core cannot represent, refused by name. The tiny presets' own conversions and
parallel layouts run in tests/converters/ (test_round_trip.py, test_parallel_layouts.py)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from converters import hf2mcore
from converters.errors import ConversionError
from converters.verify import LOGITS_MAX_ABS_DIFF
from megaswift.config import ConfigError, DataConfig, ParallelConfig, TrainConfig
from megaswift.config.validate import validate_layout
from megaswift.models import family_of, gpt_model_kwargs, hf_to_transformer_config, preset_hf_config
from tests.converters.tiny_models import save_tiny_hf_model

# Qwen2-MoE with dense layers 0 and 2; DeepSeek-V3 as Moonlight / V2-Lite (q straight from the hidden
# states, plain rope, one expert group) with one multi-token-prediction layer in the checkpoint;
# GLM-4.5-Air's kind (no qk-norm, no q/k/v biases, one group).
VARIANTS = {
    "qwen2-moe-dense-layers": ("tiny-qwen2-moe", {"mlp_only_layers": [0], "decoder_sparse_step": 2}),
    "deepseek-v3-no-q-lora-mtp": ("tiny-deepseek-v3", {"q_lora_rank": None, "rope_scaling": None, "n_group": 1,
                                                       "topk_group": 1, "num_nextn_predict_layers": 1}),
    "glm4-moe-air-like": ("tiny-glm4-moe", {"use_qk_norm": False, "attention_bias": False, "n_group": 1,
                                            "topk_group": 1}),
}
MTP_TENSORS = {"model.layers.4.eh_proj.weight": (64, 128), "model.layers.4.enorm.weight": (64,),
               "model.layers.4.self_attn.kv_a_proj_with_mqa.weight": (40, 64)}


def add_tensors(folder, shapes: dict):
    """Tensors the checkpoint holds beyond transformers' model (as DeepSeek-V3's MTP layer on the hub)."""
    tensors = load_file(folder / "model.safetensors")
    tensors.update({k: torch.randn(shape) for k, shape in shapes.items()})
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_converts_with_transformers_logits(variant, tmp_path, capsys):
    preset, overrides = VARIANTS[variant]
    hf_dir = save_tiny_hf_model(preset, tmp_path / "hf", torch.float32, None, overrides=overrides)
    if "mtp" in variant:
        add_tensors(hf_dir, MTP_TENSORS)
    report = hf2mcore(hf_dir, tmp_path / "mcore", verify=True, progress=False)
    assert report["passed"] and report["logits"]["max_abs_diff"] <= LOGITS_MAX_ABS_DIFF, report
    # the multi-token-prediction tensors are named, on stderr and in verification.json, never dropped silently
    skipped = sorted(MTP_TENSORS) if "mtp" in variant else []
    assert report["coverage"]["skipped_hf_tensors"] == skipped
    assert ("not converting 3 tensors" in capsys.readouterr().err) == bool(skipped)
    meta = json.loads((tmp_path / "mcore" / "iter_0000000" / "megaswift.json").read_text())
    if variant == "qwen2-moe-dense-layers":  # a per-layer pattern: megatron-core keeps per-layer keys
        metadata = (tmp_path / "mcore" / "iter_0000000" / ".metadata").read_bytes()
        assert b"decoder.layers.0.mlp.linear_fc1.weight" in metadata and meta["hf_config"]["mlp_only_layers"] == [0]


def test_tensors_past_the_mtp_layers_are_still_refused(tmp_path):
    preset, overrides = VARIANTS["deepseek-v3-no-q-lora-mtp"]
    hf_dir = save_tiny_hf_model(preset, tmp_path / "hf", torch.float32, None, overrides=overrides)
    add_tensors(hf_dir, {**MTP_TENSORS, "model.layers.5.eh_proj.weight": (64, 128)})
    with pytest.raises(ConversionError, match=r"1 tensors are not used by this model .*model.layers.5.eh_proj"):
        hf2mcore(hf_dir, tmp_path / "mcore", verify=False, progress=False)


def test_a_dtype_cast_keeps_the_routers_fp32_expert_bias(tmp_path):
    """hf2mcore --dtype bf16 rounds the weights, not the expert bias megatron-core keeps in fp32 (in bf16 it
    would reorder experts whose biased scores are close)."""
    from converters.mcore_reader import McoreCheckpointReader
    hf_dir = save_tiny_hf_model("tiny-glm4-moe", tmp_path / "hf", torch.float32, None)
    hf2mcore(hf_dir, tmp_path / "mcore", dtype="bf16", verify=False, progress=False)
    reader = McoreCheckpointReader(tmp_path / "mcore" / "iter_0000000")
    dtype = {key: reader.tensor_metadata(key).properties.dtype
             for key in ("decoder.layers.1.mlp.router.expert_bias", "decoder.layers.1.mlp.router.weight")}
    assert dtype == {"decoder.layers.1.mlp.router.expert_bias": torch.float32,
                     "decoder.layers.1.mlp.router.weight": torch.bfloat16}


def transformers_config(hf: dict):
    from transformers import AutoConfig
    fields = dict(hf)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


@pytest.mark.parametrize("preset", ["deepseek-v3", "kimi-k2"])
def test_yarn_of_released_configs_equals_transformers(preset):
    """megatron-core's YaRN from the mapped fields, against transformers' rotary embedding and attention
    scale for the real sizes (factor 40 / 32, 4096 original positions): no model is built."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (YarnRotaryEmbedding,
                                                                                  _yarn_get_mscale)
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    from megaswift.platform.cpu import cpu_patches
    hf = preset_hf_config(preset)
    fields = family_of(hf).transformer_fields(family_of(hf).read(hf))
    assert fields["rope_type"] == "yarn"
    with cpu_patches():
        yarn = YarnRotaryEmbedding(
            fields["qk_pos_emb_head_dim"], rotary_base=fields["rotary_base"],
            scaling_factor=fields["rotary_scaling_factor"],
            original_max_position_embeddings=fields["original_max_position_embeddings"],
            beta_fast=fields["beta_fast"], beta_slow=fields["beta_slow"], mscale=fields["mscale"],
            mscale_all_dim=fields["mscale_all_dim"], use_cpu_initialization=True)
        emb, concentration = yarn.get_emb(2)
    config = transformers_config(hf)
    reference = DeepseekV3RotaryEmbedding(config)
    half = fields["qk_pos_emb_head_dim"] // 2
    torch.testing.assert_close(emb[1, 0, 0, :half], reference.inv_freq, rtol=1e-6, atol=0)  # position 1: inv_freq
    assert concentration == pytest.approx(reference.attention_scaling, rel=1e-7)
    with torch.device("meta"):
        attention = DeepseekV3Attention(config, layer_idx=0)
    softmax_scale = _yarn_get_mscale(fields["rotary_scaling_factor"], fields["mscale_all_dim"]) ** 2 / (
        fields["qk_head_dim"] + fields["qk_pos_emb_head_dim"]) ** 0.5  # as MultiLatentAttention sets it
    assert softmax_scale == pytest.approx(attention.scaling, rel=1e-7)


def test_released_presets_map_their_routing_and_dense_layers():
    glm = hf_to_transformer_config(preset_hf_config("glm-4.5"), ParallelConfig())
    assert glm.moe_layer_freq == [0, 0, 0] + [1] * 89 and glm.moe_router_topk_scaling_factor == 2.5
    assert glm.moe_router_score_function == "sigmoid" and glm.moe_router_enable_expert_bias and glm.qk_layernorm
    assert glm.add_qkv_bias and not glm.add_bias_linear and glm.moe_shared_expert_intermediate_size == 1536
    assert gpt_model_kwargs(preset_hf_config("glm-4.5-air"), 1)["rotary_percent"] == 0.5
    v3 = hf_to_transformer_config(preset_hf_config("deepseek-v3"), ParallelConfig())
    assert (v3.moe_router_num_groups, v3.moe_router_group_topk, v3.moe_layer_freq[:4]) == (8, 4, [0, 0, 0, 1])
    assert (v3.q_lora_rank, v3.kv_lora_rank, v3.qk_head_dim, v3.qk_pos_emb_head_dim) == (1536, 512, 128, 64)
    moonlight = hf_to_transformer_config(preset_hf_config("moonlight-16b-a3b"), ParallelConfig())
    assert moonlight.q_lora_rank is None and moonlight.rope_type == "rope" and moonlight.moe_router_num_groups is None
    assert moonlight.moe_shared_expert_intermediate_size == 2 * 1408


@pytest.mark.parametrize("preset, overrides, message", [
    ("tiny-glm4-moe", {"norm_topk_prob": False}, r"norm_topk_prob=false with sigmoid routing is not supported"),
    ("tiny-deepseek-v3", {"topk_group": 1}, r"num_experts_per_tok=4 with topk_group=1 is not supported"),
    ("tiny-deepseek-v3", {"rope_interleave": False}, r"rope_interleave=False is not supported"),
    ("tiny-deepseek-v3", {"attention_bias": True}, r"attention_bias=True is not supported"),
    ("tiny-deepseek-v3", {"scoring_func": "softmax"}, r"scoring_func='softmax' is not supported"),
    ("tiny-deepseek-v3", {"rope_scaling": {"type": "yarn", "factor": 4.0, "truncate": False}},
     r"rope_scaling.truncate=False is not supported"),
    ("tiny-deepseek-v3", {"rope_scaling": {"type": "linear", "factor": 4.0}}, r"supported rope_type: default, yarn"),
])
def test_what_megatron_core_cannot_represent_is_refused(preset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        hf_to_transformer_config({**preset_hf_config(preset), **overrides}, ParallelConfig())


def test_tensor_parallel_must_divide_the_mla_latent_projections():
    """megatron-core's local MLA splits the q and kv down projections' outputs across TP as well."""
    hf = {**preset_hf_config("tiny-deepseek-v3"), "kv_lora_rank": 31}  # 31 + 8 rope dims = 39

    def validate(tp):
        return validate_layout(hf, ParallelConfig(tensor=tp), TrainConfig(micro_batch_size=1, global_batch_size=2),
                               DataConfig(seq_length=32), world_size=2)
    with pytest.raises(ConfigError, match=r"parallel.tensor=2 must divide kv_lora_rank \+ qk_rope_head_dim=39; "
                                          r"allowed: \[1\]"):
        validate(2)
    assert validate(1) == 2
