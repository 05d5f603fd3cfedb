"""PEFT adapters in and out of megaswift, checked against PEFT itself: `hf2mcore --adapter` imports a PEFT
LoRA/DoRA adapter beside the converted base, `mcore2hf` exports it again bit for bit, megaswift's logits with
it equal PeftModel's, `mcore2hf --merge` equals merge_and_unload(), and bad adapters are refused writing
nothing. Tiny fp32 Llama, adapter B (and DoRA's magnitude) made non-zero so nothing passes trivially."""
import json
import shutil

import pytest
import torch

from converters import ConversionError, hf2mcore, mcore2hf
from megaswift.checkpointing.layout import read_meta
from tests.converters.tiny_models import save_tiny_hf_model

TOKENS = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(3))


def make_peft_adapter(hf_dir, out, dora: bool, rslora: bool = False, targets="all-linear", seed=1,
                      modules_to_save=None):
    """A PEFT adapter of the HF model in `hf_dir`, saved by PEFT, with every factor (and every weight trained in
    full) random."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora,
                                                  use_rslora=rslora, modules_to_save=modules_to_save,
                                                  task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
            elif "modules_to_save" in name:
                param.add_(0.05 * torch.randn_like(param))
            elif "magnitude" in name:
                param.mul_(1 + 0.1 * torch.randn_like(param))
    peft_model.save_pretrained(out)
    return out


def peft_model_of(hf_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def peft_logits(hf_dir, adapter_dir, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return peft_model_of(hf_dir, adapter_dir)(input_ids=tokens).logits


def hf_logits(hf_dir, tokens=TOKENS) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()(input_ids=tokens).logits


def megaswift_logits(ckpt_dir, tokens=TOKENS) -> torch.Tensor:
    """megatron-core's logits (TP=1, one process) with the adapter checkpoint `ckpt_dir`, its recorded base loaded
    first, as training loads them (checkpointing.state.load_checkpoint)."""
    from converters.adapter_convert import mcore_logits_with_adapter
    return mcore_logits_with_adapter(ckpt_dir, tokens)


def peft_file_keys_match_model(hf_dir, adapter_dir) -> tuple[set, set]:
    """(keys PEFT's model has but the file lacks, keys the file has but PEFT's model does not), shapes included."""
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model_of(hf_dir, adapter_dir)).items()}
    found = {k: tuple(v.shape) for k, v in load_peft_weights(str(adapter_dir)).items()}
    return set(expected.items()) - set(found.items()), set(found.items()) - set(expected.items())


@pytest.fixture(scope="module")
def imported(hf_model_dirs, tmp_path_factory):
    """{kind: (PEFT adapter folder, hf2mcore --adapter output)} for a DoRA adapter on every linear module and an
    rsLoRA one on q, v and up (fused layers partly targeted) that also trains embed_tokens and lm_head."""
    hf_dir = hf_model_dirs("llama")
    root = tmp_path_factory.mktemp("lora_peft")
    out = {}
    for kind, options in {"dora": {"dora": True}, "rslora": {"dora": False, "rslora": True,
                                                             "targets": ["q_proj", "v_proj", "up_proj"],
                                                             "modules_to_save": ["embed_tokens", "lm_head"]}}.items():
        adapter = make_peft_adapter(hf_dir, root / f"peft-{kind}", **options)
        converted = root / f"converted-{kind}"
        hf2mcore(hf_dir, converted, verify=False, progress=False, adapter=adapter)
        out[kind] = (adapter, converted)
    return hf_dir, out


@pytest.mark.parametrize("kind", ["dora", "rslora"])
def test_import_then_export_is_bit_exact_and_loads_in_peft(imported, tmp_path, kind):
    from safetensors.torch import load_file

    hf_dir, adapters = imported
    adapter, converted = adapters[kind]
    exported = tmp_path / "exported"
    mcore2hf(converted / "adapter", exported, progress=False)
    before, after = load_file(adapter / "adapter_model.safetensors"), load_file(exported / "adapter_model.safetensors")
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    config = json.loads((exported / "adapter_config.json").read_text())
    original = json.loads((adapter / "adapter_config.json").read_text())
    for field in ("peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "task_type",
                  "base_model_name_or_path", "modules_to_save"):
        assert config[field] == original[field], field
    assert {t.rsplit(".", 1)[-1] for t in config["target_modules"]} == \
        {t.rsplit(".", 1)[-1] for t in original["target_modules"]}
    assert peft_file_keys_match_model(hf_dir, exported) == (set(), set())


@pytest.mark.parametrize("kind", ["dora", "rslora"])
def test_imported_adapter_logits_equal_peft(imported, kind):
    hf_dir, adapters = imported
    adapter, converted = adapters[kind]
    ours, theirs = megaswift_logits(converted / "adapter" / "iter_0000000"), peft_logits(hf_dir, adapter)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (theirs - hf_logits(hf_dir)).abs().max().item() > 1e-2  # the adapter matters


def test_imported_adapter_records_its_base(imported):
    _, adapters = imported
    _, converted = adapters["dora"]
    meta = read_meta(converted / "adapter" / "iter_0000000")
    assert meta["adapter"]["base"]["path"] == "../../iter_0000000"  # relative: the folder moves as a whole
    # PEFT writes all-linear out as every module of every layer; megaswift keeps the module names
    assert meta["adapter"]["tuner"] == {"type": "dora", "rank": 4, "alpha": 8.0, "dropout": 0.0, "rslora": False,
                                        "targets": "down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj",
                                        "modules_to_save": []}


@pytest.mark.parametrize("kind", ["dora", "rslora"])
def test_merge_equals_merge_and_unload(imported, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    hf_dir, adapters = imported
    adapter, converted = adapters[kind]
    mcore2hf(converted / "adapter", tmp_path / "merged", progress=False, merge=True)
    reference = peft_model_of(hf_dir, adapter).merge_and_unload().state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).state_dict()
    assert sorted(merged) == sorted(reference)
    for key in reference:
        assert (merged[key] - reference[key]).abs().max().item() <= 1e-6, key
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    gate = json.loads((tmp_path / "merged" / "verification.json").read_text())  # the conversion's own check ran
    assert gate["logits"]["passed"] and gate["logits"]["max_abs_diff"] <= 1e-4


def _refused(hf_dir, adapter, out) -> str:
    with pytest.raises(ConversionError) as error:
        hf2mcore(hf_dir, out, verify=False, progress=False, adapter=adapter)
    assert not out.exists() and not list(out.parent.glob(f"{out.name}.tmp-*"))  # nothing half-written
    return str(error.value)


def _with_config(adapter, copy, **changes):
    """A copy of a PEFT adapter folder with `changes` made to its adapter_config.json."""
    shutil.copytree(adapter, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return copy


def test_adapter_of_another_base_is_refused(imported, tiny_tokenizer_dir, tmp_path):
    hf_dir, adapters = imported
    other = save_tiny_hf_model("tiny-llama", tmp_path / "wider", torch.float32, tiny_tokenizer_dir,
                               overrides={"intermediate_size": 96})
    adapter = make_peft_adapter(other, tmp_path / "peft-wider", dora=False)
    message = _refused(hf_dir, adapter, tmp_path / "out")
    assert "adapter_model.safetensors" in message and "shape" in message and "mlp" in message, message


def test_unknown_target_module_is_refused_listing_valid_ones(imported, tmp_path):
    hf_dir, adapters = imported
    adapter = _with_config(adapters["rslora"][0], tmp_path / "renamed", target_modules=["q_proj", "qkv_proj"])
    message = _refused(hf_dir, adapter, tmp_path / "out")
    assert "adapter_config.json" in message and "qkv_proj" in message and "gate_proj" in message, message


def test_other_peft_type_is_refused(imported, tmp_path):
    hf_dir, adapters = imported
    adapter = _with_config(adapters["rslora"][0], tmp_path / "ia3", peft_type="IA3")
    message = _refused(hf_dir, adapter, tmp_path / "out")
    assert "adapter_config.json" in message and "peft_type" in message and "IA3" in message, message


def test_merge_of_a_full_checkpoint_is_refused(imported, tmp_path):
    _, adapters = imported
    with pytest.raises(ConversionError, match="full checkpoint"):
        mcore2hf(adapters["dora"][1], tmp_path / "out", progress=False, merge=True)
    assert not (tmp_path / "out").exists()


def test_mlp_adapter_peft_would_misplace_is_refused(tiny_tokenizer_dir, tmp_path):
    """Why mcore2hf refuses: on model types whose MoE layout transformers 5 converts (GLM-4.5, DeepSeek-V3,
    Qwen3-MoE, ...), PEFT maps `gate_proj` / `up_proj` / `down_proj` to the routed experts' fused parameters
    even in a dense layer, so a PEFT folder adapting the dense MLP loads without error and without effect.
    This test fails when PEFT loads it faithfully; the refusal can then go."""
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from converters.peft_adapter import check_peft_can_load, modules_peft_moves_to_experts

    hf_dir = save_tiny_hf_model("tiny-glm4-moe", tmp_path / "hf", torch.float32, tiny_tokenizer_dir)
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    tensors, adapted = {}, AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for name in ("gate_proj", "up_proj"):  # PEFT refuses one of the two fused names alone
        dense = getattr(base.model.layers[0].mlp, name)  # first_k_dense_replace=1: layer 0 is a dense MLP
        a, b = torch.randn(4, dense.in_features), torch.randn(dense.out_features, 4)
        tensors.update({f"base_model.model.model.layers.0.mlp.{name}.lora_A.weight": a,
                        f"base_model.model.model.layers.0.mlp.{name}.lora_B.weight": b})
        with torch.no_grad():  # what the adapter means: W + (alpha / r) B A on the dense layer
            getattr(adapted.model.layers[0].mlp, name).weight.add_(2.0 * b @ a)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": ["gate_proj", "up_proj"], "base_model_name_or_path": str(hf_dir)}))
    with torch.no_grad():
        meant = adapted(input_ids=TOKENS).logits
        loaded = PeftModel.from_pretrained(base, adapter).eval()(input_ids=TOKENS).logits
    assert not torch.allclose(loaded, meant, atol=1e-3), "PEFT now applies dense-layer MLP adapters on glm4_moe"

    assert {"gate_proj", "up_proj", "down_proj"} <= modules_peft_moves_to_experts("glm4_moe")
    assert not modules_peft_moves_to_experts("llama")
    attention = {"base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight": torch.zeros(1)}
    check_peft_can_load(attention, "glm4_moe", tmp_path)  # attention-only adapters load fine
    check_peft_can_load(tensors, "llama", tmp_path)
    with pytest.raises(ConversionError, match=r"layers\.0\.mlp\.gate_proj .*--merge"):
        check_peft_can_load(tensors, "glm4_moe", tmp_path)
