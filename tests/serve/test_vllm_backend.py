"""`megaswift deploy --backend vllm`: a clear error without vLLM; the command handed to vLLM's server; what megaswift
exports (a model folder and a PEFT adapter, through hf2mcore + mcore2hf) passes the checks vLLM applies when it loads
them, and deliberately broken copies are refused naming the file and the problem."""
import importlib.util
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megaswift.cli.main import main
from megaswift.serve.vllm_backend import VLLM_SERVER_MODULE, vllm_command
from megaswift.serve.vllm_checks import (SAFETENSORS_INDEX, VLLMLoadError, adapter_problems, check_for_vllm,
                                         model_folder_problems)


@pytest.fixture(scope="module")
def exported(tiny_chat_model, tiny_adapters, tmp_path_factory):
    """(model folder, PEFT adapter folder) as megaswift exports them: the tiny chat model and its adapter alpha
    imported with hf2mcore, then exported with mcore2hf."""
    from converters import hf2mcore, mcore2hf
    root = tmp_path_factory.mktemp("vllm_exports")
    hf2mcore(tiny_chat_model, root / "ckpt", verify=False, progress=False, adapter=tiny_adapters["alpha"])
    mcore2hf(root / "ckpt", root / "model", verify=False, progress=False)
    mcore2hf(root / "ckpt" / "adapter", root / "adapter", verify=False, progress=False)
    return root / "model", root / "adapter"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_is_a_clear_error(tmp_path, capsys):
    assert main(["deploy", "--model", str(tmp_path), "--backend", "vllm"]) == 1
    err = capsys.readouterr().err
    assert "vLLM is not installed" in err and "--backend transformers" in err


def test_command_serves_adapters_by_name_with_their_rank(exported, tmp_path):
    from megaswift.serve.tiny_model import build_tiny_lora_adapter
    model, _ = exported
    adapters = {name: str(build_tiny_lora_adapter(model, tmp_path / name, seed=1, rank=rank))
                for name, rank in (("small", 8), ("big", 24))}
    command = vllm_command(model, "mine", adapters, "0.0.0.0", 9000, "KEY", "auto", 16)
    assert command[1:3] == ["-m", VLLM_SERVER_MODULE]
    flags = " ".join(command[3:])
    assert f"--model {model} --served-model-name mine --host 0.0.0.0 --port 9000" in flags
    assert f"--lora-modules small={tmp_path / 'small'} big={tmp_path / 'big'}" in flags
    assert "--max-lora-rank 32" in flags and "--max-loras 2" in flags  # rank 24 needs vLLM's next choice, 32
    assert "--tool-call-parser hermes" in flags and "--api-key KEY" in flags
    assert "--enable-lora" not in vllm_command(model, "m", {}, "h", 1, None, "auto", 1)


def test_megaswift_exports_pass_vllm_load_checks(exported):
    model, adapter = exported
    assert (model / SAFETENSORS_INDEX).is_file()  # so the index checks below run on a real one
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    assert model_folder_problems(model) == []
    assert adapter_problems(adapter, model) == []
    check_for_vllm(model, {"alpha": str(adapter)})


def _copy(folder, tmp_path, config_file, edit_config=None, edit_tensors=None, tensors_file=None):
    """A copy of `folder` with its JSON `config_file` and/or its one safetensors file edited in place."""
    copy = shutil.copytree(folder, tmp_path / folder.name)
    if edit_config:
        config = json.loads((copy / config_file).read_text())
        edit_config(config)
        (copy / config_file).write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(copy / tensors_file)
        edit_tensors(tensors)
        save_file(tensors, copy / tensors_file)
    return copy


def _drop_lm_head(tensors):
    del tensors["lm_head.weight"]


def _unindex_first(config):
    del config["weight_map"][sorted(config["weight_map"])[0]]


def _index_ghost_shard(config):
    config["weight_map"]["model.extra.weight"] = "model-00002-of-00002.safetensors"


def _widen_mlp(config):
    config["intermediate_size"] *= 2


@pytest.mark.parametrize("config_file, edit_config, edit_tensors, message", [
    ("config.json", lambda c: c.update(architectures=["GPT2LMHeadModel"]), None, "architectures=['GPT2LMHeadModel']"),
    ("config.json", lambda c: [c.pop(k, None) for k in ("dtype", "torch_dtype")], None, "dtype/torch_dtype=None"),
    ("config.json", lambda c: c.update(dtype="int8"), None, "dtype/torch_dtype='int8'"),
    ("config.json", lambda c: c.pop("max_position_embeddings"), None, "max_position_embeddings=None"),
    ("config.json", _widen_mlp, None, "mlp.down_proj.weight has shape [64, 128], the config gives [64, 256]"),
    (SAFETENSORS_INDEX, lambda c: c["weight_map"].pop("lm_head.weight"), _drop_lm_head,
     "lm_head.weight must be saved"),
    (SAFETENSORS_INDEX, _unindex_first, None, "1 tensor(s) not listed under the file holding them"),
    (SAFETENSORS_INDEX, _index_ghost_shard, None, "names model-00002-of-00002.safetensors, which is missing"),
], ids=["architecture", "no-dtype", "bad-dtype", "no-context", "shape", "untied-no-lm-head", "index-misses-tensor",
        "index-names-missing-file"])
def test_broken_model_folders_are_refused(exported, tmp_path, config_file, edit_config, edit_tensors, message):
    model, _ = exported
    broken = _copy(model, tmp_path, config_file, edit_config, edit_tensors, "model.safetensors")
    problems = model_folder_problems(broken)
    assert len(problems) == 1 and message in problems[0], problems
    assert str(broken) in problems[0]
    with pytest.raises(VLLMLoadError, match="vLLM would refuse to load this"):
        vllm_command(broken, "m", {}, "h", 1, None, "auto", 1)


def test_missing_lm_head_is_fine_when_tied_and_chat_template_is_required(exported, tmp_path):
    model, _ = exported
    tied = _copy(model, tmp_path / "tied", "config.json", lambda c: c.update(tie_word_embeddings=True), _drop_lm_head,
                 "model.safetensors")
    index = json.loads((tied / SAFETENSORS_INDEX).read_text())
    del index["weight_map"]["lm_head.weight"]
    (tied / SAFETENSORS_INDEX).write_text(json.dumps(index))
    assert model_folder_problems(tied) == []  # vLLM ties lm_head to the embedding, as transformers does
    (tied / "chat_template.jinja").unlink()
    assert ["no chat template" in p for p in model_folder_problems(tied)] == [True]


def _retarget_to(module):
    def edit(tensors):
        key = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
        tensors[f"base_model.model.{module}.lora_A.weight"] = tensors.pop(key)
    return edit


@pytest.mark.parametrize("edit_config, edit_tensors, message", [
    (lambda c: c.update(use_dora=True), None, "use_dora=true; vLLM serves no DoRA"),
    (lambda c: c.update(modules_to_save=["lm_head"]), None, "modules_to_save=['lm_head']"),
    (lambda c: c.update(bias="lora_only"), None, "bias='lora_only'"),
    (lambda c: c.pop("lora_alpha"), None, "missing ['lora_alpha']"),
    (lambda c: c.update(rank_pattern={"q_proj": 1024}), None, "rank 1024 is above --max-lora-rank 512"),
    (lambda c: c.update(r=4), None, "shape [8, 64], expected [4, 64]"),
    (None, _retarget_to("lm_head"), "targets lm_head, not one of the model's LoRA-able linear layers"),
    (None, _retarget_to("model.layers.0.input_layernorm"), "targets model.layers.0.input_layernorm"),
    (None, lambda t: t.update(extra=torch.zeros(2)), "tensor extra: expected base_model.model.<module>.lora_A"),
], ids=["dora", "modules-to-save", "bias", "no-alpha", "rank-above-max", "rank-mismatch", "lm-head",
        "not-linear", "unknown-tensor"])
def test_broken_adapters_are_refused(exported, tmp_path, edit_config, edit_tensors, message):
    model, adapter = exported
    broken = _copy(adapter, tmp_path, "adapter_config.json", edit_config, edit_tensors, "adapter_model.safetensors")
    problems = adapter_problems(broken, model)
    assert any(message in p for p in problems), problems
    assert all(str(broken) in p for p in problems)
    with pytest.raises(VLLMLoadError, match=re.escape(f"adapter bad: {broken}")):
        check_for_vllm(model, {"bad": str(broken)})
