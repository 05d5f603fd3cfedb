"""LoRA/DoRA on GLM-4.5 MoE and DeepSeek-V3 (multi-latent attention) at TP=1, against PEFT's own layers
injected into transformers' model (support.peft_layers_reference says why not get_peft_model), and the
refusals."""
import pytest
import torch

from megaswift.config import ConfigError, ParallelConfig
from megaswift.models.families import preset_hf_config
from tests.tuners import support


def _logits(model, tokens, vocab):
    model.eval()
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0), None)[..., :vocab].float()


@pytest.mark.parametrize("name,kind", [("glm4-moe", "lora"), ("deepseek-v3", "dora"),
                                       ("deepseek-v3-no-q-lora", "lora")])
def test_imported_adapter_gives_peft_logits(tiny_base, name, kind):
    """all-linear on a dense layer and a MoE layer: attention (MLA's q/kv down and up projections), dense
    MLP and shared experts. Logits with the imported adapter equal PEFT's, and the base's with adapters
    disabled; import then export is bit-exact, with exactly PEFT's keys."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from converters.process_group import single_process_model_parallel
    from megaswift.tuners import adapter_state, adapter_to_peft, adapters_disabled

    hf_dir, ckpt, hf = tiny_base(name)
    model, holder, state = support.peft_layers_reference(hf_dir, name, kind)
    adapted = {n.rsplit(".", 1)[-1] for n, m in holder.named_modules() if isinstance(m, BaseTunerLayer)}
    assert adapted == {t.rsplit(".", 1)[-1] for t in support.LAYER_TARGETS[name]}, "PEFT must adapt every module named"
    tokens = support.tokens_for(hf["vocab_size"])
    expected = support.hf_logits(model, tokens)
    for layer in holder.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.enable_adapters(False)
    base = support.hf_logits(model, tokens)
    assert (expected - base).abs().max() > 0.1, "the adapter must change the logits, or nothing is tested"
    with single_process_model_parallel():
        chunks, _ = support.build_tuned_chunks(hf, ckpt, support.tuner_config(kind), ParallelConfig(), state)
        ours = _logits(chunks[0], tokens, hf["vocab_size"])
        with adapters_disabled(chunks):
            ours_base = _logits(chunks[0], tokens, hf["vocab_size"])
        exported = adapter_to_peft(adapter_state(chunks), hf)
    assert (ours - expected).abs().max() < 1e-4
    assert (ours_base - base).abs().max() < 1e-4
    assert set(exported) == set(state)
    assert all(torch.equal(exported[k], state[k]) for k in state), "import then export must be bit-exact"


def test_mla_targets_by_name():
    """Explicit names reach the MLA linear they are converted into, and only that part."""
    from megaswift.tuners import select_targets

    hf = preset_hf_config("tiny-deepseek-v3")
    chosen = select_targets(hf, "q_a_proj,q_b_proj,kv_a_proj_with_mqa,kv_b_proj,self_attn.o_proj")
    assert {name.split(".", 3)[-1]: parts for name, (_, parts) in chosen.items()
            if name.startswith("decoder.layers.1.")} == {
        "self_attention.linear_q_down_proj": ("q_a_proj",), "self_attention.linear_q_up_proj": ("q_b_proj",),
        "self_attention.linear_kv_down_proj": ("kv_a_proj_with_mqa",),
        "self_attention.linear_kv_up_proj": ("kv_b_proj",), "self_attention.linear_proj": ("o_proj",)}
    assert set(select_targets(hf, "mlp.gate_proj")) == {"decoder.layers.0.mlp.linear_fc1"}  # the dense layer only
    no_q_lora = {**hf, "q_lora_rank": None}
    assert set(select_targets(no_q_lora, "q_proj")) == {f"decoder.layers.{i}.self_attention.linear_q_proj"
                                                        for i in range(hf["num_hidden_layers"])}


def test_refusals():
    from dataclasses import replace

    from megaswift.models.families import hf_view
    from megaswift.models.families.rules import dims_of
    from megaswift.models.families.transforms import Transform, ValueMap
    from megaswift.tuners import select_targets
    from megaswift.tuners.targets import check_row_move, fused_linears

    glm, deepseek = preset_hf_config("tiny-glm4-moe"), preset_hf_config("tiny-deepseek-v3")
    for hf in (glm, deepseek):  # a bare MLP name also names the routed experts
        with pytest.raises(ConfigError, match=r"routed MoE experts \(model\.layers\.1\.mlp\.experts\.0\.up_proj"):
            select_targets(hf, "up_proj")
    with pytest.raises(ConfigError, match=r"unknown module name 'q_proj' for deepseek-v3; valid names: all-linear, "
                                          r"kv_a_proj_with_mqa, kv_b_proj"):
        select_targets(deepseek, "q_proj")  # this model has a q bottleneck: q_a_proj, q_b_proj
    with pytest.raises(ConfigError, match=r"unknown module name 'q_a_proj' for glm4-moe"):
        select_targets(glm, "q_a_proj")

    # a conversion that is not a row move has no exact adapter: kv_b_proj as if its rows were converted with
    # a value change, or with rows dropped or duplicated
    kv_up = next(f for f in fused_linears(deepseek) if f.mcore.endswith("1.self_attention.linear_kv_up_proj"))
    dims, shape = dims_of(hf_view(deepseek)), (4 * 32, 32)
    check_row_move(kv_up, dims, shape)  # the real rule: accepted
    scaled = replace(kv_up, transform=Transform("scaled", kv_up.transform.placement,
                                                ValueMap(lambda t: 2 * t, lambda t: t / 2)))
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.self_attn\.kv_b_proj cannot be adapted: the conversion "
                                          r"into decoder\.layers\.1\.self_attention\.linear_kv_up_proj \(scaled\) "
                                          r"changes values"):
        check_row_move(scaled, dims, shape)
    halves = replace(kv_up, transform=Transform("halves",
                                                lambda d, s: [[(0, 0, s[0] // 2), (0, s[0] // 2, s[0] // 2)]]))
    with pytest.raises(ConfigError, match=r"kv_b_proj cannot be adapted: .*\(halves\) does not place every row"):
        check_row_move(halves, dims, shape)
    gap = replace(kv_up, transform=Transform("gap", lambda d, s: [[(0, 0, s[0] - 1)]]))
    with pytest.raises(ConfigError, match=r"\(gap\) leaves megatron-core rows empty"):
        check_row_move(gap, dims, shape)
