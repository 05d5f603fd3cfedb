"""`megaswift export --quant gptq-int4 | awq-int4`: GPT-QModel on CPU; the folder loads with transformers, generates,
keeps the model's perplexity close and is smaller on disk."""
import json
import math

import pytest
import torch

from megaswift.cli.main import main
from megaswift.serve.quantize import load_quantized

pytest.importorskip("gptqmodel")
pytest.importorskip("optimum")


def _export_and_check(model_dir, out, method, layer, extra=()):
    assert main(["export", "--model", str(model_dir), "--quant", method, "--output", str(out), "--group-size", "32",
                 "--calib-samples", "8", *extra]) == 0
    report = json.loads((out / "quantization.json").read_text())
    assert report["bytes_after"] < report["bytes_before"]  # int4 weights packed 8 to an int32
    assert math.isfinite(report["perplexity_after"])
    # calibrated 4-bit weights change the model's predictions little
    assert abs(math.log(report["perplexity_after"]) - math.log(report["perplexity_before"])) < 0.5
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"]) == (method.split("-")[0], 4, 32)
    model = load_quantized(out, "cpu")  # AutoModelForCausalLM.from_pretrained with a pure-torch CPU kernel
    assert type(model.model.layers[0].mlp.up_proj).__name__ == layer
    generated = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > 3 and generated[0, :3].tolist() == [5, 6, 7]  # may end early at end of turn
    return report


def test_gptq_int4_on_cpu_calibrated_on_sft_rows(tiny_chat_model, tmp_path, monkeypatch):
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # gptqmodel writes ./logs; the export moves them into the output folder
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"query": f"Say hello {i}.", "response": "Hello there, friend!"}) + "\n"
                             for i in range(8)))
    report = _export_and_check(tiny_chat_model, tmp_path / "gptq", "gptq-int4", "TorchLinear", ["--calib", str(calib)])
    assert report["calibration_samples"] == 8 and report["calibration"] == str(calib)
    assert list(workdir.iterdir()) == []
    assert any((tmp_path / "gptq" / "quantization_logs").iterdir())


def test_awq_int4_on_cpu(tmp_path):
    from megaswift.serve.tiny_model import build_tiny_chat_model
    # AWQ's clip search needs layer outputs in multiples of 64: the session tiny model's value projection is 32
    model_dir = build_tiny_chat_model(tmp_path / "tiny128", hidden=128, steps=30)
    _export_and_check(model_dir, tmp_path / "awq", "awq-int4", "AwqTorchLinear")
    assert json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]["format"] == "gemm"
