"""`hf2mcore --adapter` keeps PEFT's qualified target_modules (`mlp.down_proj`, `shared_experts.up_proj`) on
a GLM-4.5 MoE model, where the bare MLP names also name the routed experts: the imported adapter gives the
logits of PEFT's own layers, and a bare `gate_proj` is still refused naming the routed experts."""
import json

import pytest
import torch
from safetensors.torch import save_file

from converters import ConversionError, hf2mcore
from converters.adapter_convert import mcore_logits_with_adapter
from megaswift.checkpointing.layout import read_meta
from tests.tuners import support

# what PEFT's suffix match makes of these is exactly support.LAYER_TARGETS["glm4-moe"] (checked below):
# qualified in several ways, and one name spelled from the model's root (layer 0 is the only dense layer)
QUALIFIED = ["self_attn.q_proj", "self_attn.k_proj", "v_proj", "o_proj", "mlp.gate_proj", "mlp.up_proj",
             "model.layers.0.mlp.down_proj", "mlp.shared_experts.gate_proj", "shared_experts.up_proj",
             "shared_experts.down_proj"]


def _adapter_folder(folder, state, targets):
    folder.mkdir()
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": support.RANK, "lora_alpha": support.ALPHA,
        "use_rslora": True, "use_dora": False, "lora_dropout": 0.0, "bias": "none", "target_modules": targets}))
    return folder


def test_qualified_mlp_targets_import_on_glm4_moe(tiny_base, tmp_path):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    hf_dir, _, hf = tiny_base("glm4-moe")
    model, _, state = support.peft_layers_reference(hf_dir, "glm4-moe", "lora")
    adapted = {key.split(".lora_")[0][len("base_model.model."):] for key in state}
    config = LoraConfig(target_modules=QUALIFIED)
    assert {name for name, module in support.load_hf(hf_dir).named_modules() if isinstance(module, torch.nn.Linear)
            and check_target_module_exists(config, name)} == adapted, "PEFT must read QUALIFIED as the reference"
    assert "model.layers.0.mlp.down_proj" in adapted and "model.layers.1.mlp.shared_experts.up_proj" in adapted

    out = tmp_path / "converted"
    hf2mcore(hf_dir, out, verify=False, progress=False, adapter=_adapter_folder(tmp_path / "peft", state, QUALIFIED))
    ckpt = out / "adapter" / "iter_0000000"
    assert read_meta(ckpt)["config"]["tuner"]["targets"].split(",") == sorted(
        {"mlp.down_proj" if t.startswith("model.") else t for t in QUALIFIED})

    tokens = support.tokens_for(hf["vocab_size"])
    expected = support.hf_logits(model, tokens)
    assert (mcore_logits_with_adapter(ckpt, tokens) - expected).abs().max() < 1e-4


def test_bare_mlp_name_still_refused_on_glm4_moe(tiny_base, tmp_path):
    hf_dir, _, _ = tiny_base("glm4-moe")
    _, _, state = support.peft_layers_reference(hf_dir, "glm4-moe", "lora")
    bare = [t for t in QUALIFIED if t != "mlp.gate_proj"] + ["gate_proj"]
    out = tmp_path / "converted"
    with pytest.raises(ConversionError, match=r"adapter_config\.json target_modules.*'gate_proj' matches routed MoE "
                                              r"experts \(model\.layers\.1\.mlp\.experts\.0\.gate_proj.* e\.g\. .*"
                                              r"mlp\.gate_proj"):
        hf2mcore(hf_dir, out, verify=False, progress=False, adapter=_adapter_folder(tmp_path / "peft", state, bare))
    assert not out.exists()


def test_target_names_kept_as_peft_reads_them(tmp_path):
    from converters.peft_adapter import tuner_from_peft_config

    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}
    file = tmp_path / "adapter_config.json"
    targets = ["base_model.model.model.layers.2.mlp.shared_experts.gate_proj", "mlp.down_proj", "q_proj",
               "layers.0.self_attn.q_proj"]
    assert tuner_from_peft_config({**config, "target_modules": targets}, file)["targets"] == \
        "mlp.down_proj,mlp.shared_experts.gate_proj,q_proj,self_attn.q_proj"
    for bad in ([3], ["q_proj,v_proj"], {"q_proj": 1}):
        with pytest.raises(ConversionError, match=r"adapter_config\.json: target_modules.* module name"):
            tuner_from_peft_config({**config, "target_modules": bad}, file)
