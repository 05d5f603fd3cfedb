"""`mcore2hf --merge` on GLM-4.5 MoE and DeepSeek-V3 (MLA): the merged HF weights equal PEFT's merge.

The adapter covers all-linear (attention or every MLA projection, the dense layer's MLP, the shared experts)
with random tensors (B non-zero). For these model types PEFT 0.21 on transformers 5 loads MLP targets onto
the routed experts (support.peft_layers_reference), so two references, both PEFT's own merge code:
- every tensor: PEFT's LoRA/DoRA layers injected into the decoder layers, each merged by PEFT (`merge()`);
- attention (what PeftModel can load for these model types): PeftModel.from_pretrained on an attention-only
  adapter folder holding the same tensors, then merge_and_unload()."""
import pytest
import torch

from tests.tuners import support

ATTENTION = {"glm4-moe": ("q_proj", "k_proj", "v_proj", "o_proj"),
             "deepseek-v3": ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")}


def _save_peft_folder(folder, state: dict, kind: str, targets):
    """A PEFT adapter folder (LoraConfig.save_pretrained + safetensors) of these tensors."""
    import peft
    from safetensors.torch import save_file

    folder.mkdir()
    peft.LoraConfig(r=support.RANK, lora_alpha=support.ALPHA, use_rslora=True, use_dora=kind == "dora",
                    target_modules=targets, lora_dropout=0.0).save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def _peft_layers_merged(model, holder) -> dict[str, torch.Tensor]:
    """The HF model's tensors after PEFT merges each of its injected layers (names without PEFT's wrapping)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    with torch.no_grad():
        for layer in holder.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.merge()
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}


@pytest.mark.parametrize("name,kind", [("glm4-moe", "lora"), ("deepseek-v3", "dora")])
def test_merge_equals_peft_merge(tiny_base, name, kind, tmp_path):
    import json

    from peft import PeftModel

    from converters import hf2mcore, mcore2hf

    hf_dir, _, _ = tiny_base(name)
    model, holder, state = support.peft_layers_reference(hf_dir, name, kind)
    # all-linear: PEFT would rewrite qualified MLP names for these model types; megaswift imports the same set
    hf2mcore(hf_dir, tmp_path / "ckpt", verify=False, progress=False,
             adapter=_save_peft_folder(tmp_path / "peft", state, kind, "all-linear"))
    mcore2hf(tmp_path / "ckpt" / "adapter", tmp_path / "merged", progress=False, merge=True)
    merged = support.load_hf(tmp_path / "merged").state_dict()  # as transformers reads it (fused experts)
    base = support.load_hf(hf_dir).state_dict()

    reference = _peft_layers_merged(model, holder)
    assert sorted(merged) == sorted(reference)
    changed = {k for k in reference if not torch.equal(reference[k], base[k])}
    modules = {k.rsplit(".", 2)[-2] for k in changed}
    assert modules == {*ATTENTION[name], "gate_proj", "up_proj", "down_proj"}, modules
    assert any(".shared_experts." in k for k in changed) and not any(".experts." in k for k in changed)
    assert {t.dtype for t in merged.values()} == {torch.float32}  # the base's dtype
    for key in reference:
        assert (merged[key] - reference[key]).abs().max().item() <= 1e-6, key

    attention = {k: v for k, v in state.items() if k.split(".lora_")[0].rsplit(".", 1)[-1] in ATTENTION[name]}
    folder = _save_peft_folder(tmp_path / "peft_attention", attention, kind, list(ATTENTION[name]))
    unloaded = PeftModel.from_pretrained(support.load_hf(hf_dir), folder).merge_and_unload().state_dict()
    attention_keys = [k for k in unloaded if k.endswith(".weight") and k.rsplit(".", 2)[-2] in ATTENTION[name]]
    assert attention_keys and all(not torch.equal(unloaded[k], base[k]) for k in attention_keys)
    for key in attention_keys:
        assert (merged[key] - unloaded[key]).abs().max().item() <= 1e-6, key
    gate = json.loads((tmp_path / "merged" / "verification.json").read_text())  # the conversion's own check ran
    assert gate["logits"]["passed"]
