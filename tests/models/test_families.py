"""The family registry against transformers' own models: each family's typed view reads the facts
transformers reads, and its conversion rules name exactly the tensors transformers' model has, also
where layers differ (dense layers in an MoE model). Built on the meta device: no weights, fast."""
import pytest
import torch

from megaswift.config import ParallelConfig
from megaswift.models import hf_to_transformer_config
from megaswift.models.families import (FAMILIES, PRESETS, REGISTERED, UnsupportedModelError, family_of, hf_view,
                                       preset_hf_config)
from megaswift.models.families.transforms import Dims, Transform, ValueMap

TINY = sorted({f.tiny_preset for f in REGISTERED} | {"tiny-llama3"})


def transformers_model(hf: dict):
    from transformers import AutoConfig, AutoModelForCausalLM
    fields = dict(hf)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        return config, AutoModelForCausalLM.from_config(config)


def hf_keys_of(hf: dict) -> set[str]:
    family = family_of(hf)
    return {k for m in family.tensor_mappings(family.read(hf)) for k in m.hf}


def test_every_architecture_has_one_family_and_every_preset_reads():
    assert sorted(FAMILIES) == sorted(a for f in REGISTERED for a in f.architectures)
    for name in PRESETS:
        view = hf_view(preset_hf_config(name))
        assert view.architecture in family_of(preset_hf_config(name)).architectures, name


def test_an_unknown_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match=r"x/config.json: architectures=\['GPT2LMHeadModel'\] is not "
                                                    r"supported; supported: \[.*'LlamaForCausalLM'"):
        family_of({"architectures": ["GPT2LMHeadModel"]}, where="x/config.json")


@pytest.mark.parametrize("preset", TINY)
def test_the_view_reads_what_transformers_reads(preset):
    hf = preset_hf_config(preset)
    hf.pop("norm_topk_prob", None)  # a default each side derives on its own
    config, model = transformers_model(hf)
    view = hf_view(hf)
    attention = model.model.layers[0].self_attn
    if view.mla:  # multi-latent attention: every head its own k/v, from the latent (tests/models/test_new_families.py)
        assert view.num_kv_heads == view.num_attention_heads == attention.num_heads
        assert view.head_dim == attention.qk_head_dim
    else:
        assert view.num_kv_heads == config.num_key_value_heads
        assert view.head_dim == attention.head_dim
        assert view.qkv_bias == (attention.q_proj.bias is not None)
        assert view.qk_norm == hasattr(attention, "q_norm")
    assert view.tied_embeddings == (model.lm_head.weight is model.model.embed_tokens.weight)
    for layer, decoder_layer in enumerate(model.model.layers):
        assert view.is_moe_layer(layer) == hasattr(decoder_layer.mlp, "experts"), layer
    if view.moe:
        assert view.num_experts == (getattr(config, "num_local_experts", None) or config.num_experts)
        # Mixtral's router always renormalises; the Qwen MoE configs default to not renormalising.
        assert view.moe.norm_topk_prob == getattr(config, "norm_topk_prob", True)
        mlp = next(m.mlp for i, m in enumerate(model.model.layers) if view.is_moe_layer(i))
        shared = getattr(mlp, "shared_expert", None) or getattr(mlp, "shared_experts", None)
        assert view.moe.shared_expert_ffn_hidden_size == (shared.down_proj.in_features if shared else 0)


def saved_keys(hf: dict, folder) -> set[str]:
    """The tensor names transformers' save_pretrained writes (per-expert MoE weights, as on the hub)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    fields = dict(hf)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields)).save_pretrained(folder)
    keys = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            keys |= set(f.keys())
    return keys


@pytest.mark.parametrize("preset", TINY)
def test_the_rules_name_exactly_the_tensors_transformers_saves(preset, tmp_path):
    hf = preset_hf_config(preset)
    assert hf_keys_of(hf) == saved_keys(hf, tmp_path)


@pytest.mark.parametrize("preset", ["tiny-qwen2-moe", "tiny-qwen3-moe"])
def test_rules_follow_the_layer_index_where_layers_differ(preset, tmp_path):
    """Dense layers inside an MoE model: the rules of those layers are dense ones, as transformers'
    modules are, and megatron-core gets the same pattern as `moe_layer_freq` (its logits against
    transformers': tests/models/test_new_families.py)."""
    hf = {**preset_hf_config(preset), "mlp_only_layers": [0], "decoder_sparse_step": 2}
    assert hf_view(hf).moe.dense_layers == (0, 2)
    keys = hf_keys_of(hf)
    assert keys == saved_keys(hf, tmp_path)
    assert {"model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight"} <= keys
    assert hf_to_transformer_config(hf, ParallelConfig()).moe_layer_freq == [0, 1, 0, 1]
    # all-MoE models keep the int, so their checkpoints keep megatron-core's stacked-layer keys
    assert hf_to_transformer_config(preset_hf_config(preset), ParallelConfig()).moe_layer_freq == 1


def test_a_transform_may_change_values_as_exact_inverses():
    """A norm stored as `w - 1` on one side (as some families do), the rows placed as the identity."""
    dims = Dims(num_heads=1, num_query_groups=1, head_dim=1, vocab_size=4)
    offset = Transform("offset_norm", lambda d, shape: [[(0, 0, shape[0])]],
                       ValueMap(to_mcore=lambda t: t + 1.0, to_hf=lambda t: t - 1.0))
    hf = torch.tensor([0.5, -0.25, 2.0, 0.0])
    mcore = offset.to_mcore([hf], dims, (4,))
    assert torch.equal(mcore, torch.tensor([1.5, 0.75, 3.0, 1.0]))
    (back,) = offset.to_hf(mcore, dims)
    assert torch.equal(back, hf)
