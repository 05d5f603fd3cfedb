"""`megaswift deploy --backend vllm`: a clear error without vLLM; the command handed to vLLM's server."""
import importlib.util
import json

import pytest

from megaswift.cli.main import main
from megaswift.serve.vllm_backend import VLLM_SERVER_MODULE, vllm_command


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_is_a_clear_error(tmp_path, capsys):
    assert main(["deploy", "--model", str(tmp_path), "--backend", "vllm"]) == 1
    err = capsys.readouterr().err
    assert "vLLM is not installed" in err and "--backend transformers" in err


def test_command_serves_adapters_by_name_with_their_rank(tmp_path):
    adapters = {}
    for name, rank in (("small", 8), ("big", 24)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
        adapters[name] = str(tmp_path / name)
    command = vllm_command(tmp_path / "model", "mine", adapters, "0.0.0.0", 9000, "KEY", "auto", 16)
    assert command[1:3] == ["-m", VLLM_SERVER_MODULE]
    flags = " ".join(command[3:])
    assert f"--model {tmp_path / 'model'} --served-model-name mine --host 0.0.0.0 --port 9000" in flags
    assert f"--lora-modules small={tmp_path / 'small'} big={tmp_path / 'big'}" in flags
    assert "--max-lora-rank 32" in flags and "--max-loras 2" in flags  # rank 24 needs vLLM's next choice, 32
    assert "--tool-call-parser hermes" in flags and "--api-key KEY" in flags
    assert "--enable-lora" not in vllm_command(tmp_path, "m", {}, "h", 1, None, "auto", 1)
