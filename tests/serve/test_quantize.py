"""`megaswift export --quant`: bitsandbytes and torchao FP8 on CPU; the folder loads with transformers as it is and
generates. GPTQ/AWQ (gptqmodel): test_quantize_gptqmodel.py."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from megaswift.cli.main import main
from megaswift.serve.quantize import QuantizationError, check_layer_sizes
from megaswift.serve.vllm_checks import model_folder_problems

@pytest.mark.parametrize("method, layer, tolerance", [("bnb-int8", "Linear8bitLt", 0.05),
                                                      ("bnb-nf4", "Linear4bit", 0.5)])
def test_quantized_folder_loads_and_generates(tiny_chat_model, tmp_path, method, layer, tolerance):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / method
    assert main(["export", "--model", str(tiny_chat_model), "--quant", method, "--output", str(out)]) == 0
    report = json.loads((out / "quantization.json").read_text())
    assert report["bytes_after"] < report["bytes_before"]
    # quantization changes the weights a little, the model's predictions little
    assert abs(math.log(report["perplexity_after"]) - math.log(report["perplexity_before"])) < tolerance
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(model.model.layers[0].mlp.up_proj).__name__ == layer
    generated = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > 3 and generated[0, :3].tolist() == [5, 6, 7]  # may end early at end of turn
    # `deploy --backend vllm` hands the folder on: its packed weights and quant states are not refused
    assert model_folder_problems(out) == []


def test_group_size_minus_one_is_accepted_where_none_divides():
    """-1 (one group per output row) is what the refusal suggests when no group size fits: it must pass."""
    config = {"hidden_size": 96, "intermediate_size": 200}
    with pytest.raises(QuantizationError, match="Use --group-size -1"):
        check_layer_sizes(config, 128, "gptq-int4")
    check_layer_sizes(config, -1, "gptq-int4")
    with pytest.raises(QuantizationError):
        check_layer_sizes(config, 0, "gptq-int4")


def test_fp8_with_torchao_on_cpu(tiny_chat_model, tmp_path):
    pytest.importorskip("torchao")
    out = tmp_path / "fp8"
    assert main(["export", "--model", str(tiny_chat_model), "--quant", "fp8", "--output", str(out)]) == 0
    report = json.loads((out / "quantization.json").read_text())
    assert report["bytes_after"] < report["bytes_before"]  # linear weights: 1 byte each instead of 4
    assert abs(math.log(report["perplexity_after"]) - math.log(report["perplexity_before"])) < 0.1
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")  # the folder as it is
    weight = model.model.layers[0].mlp.up_proj.weight
    assert type(weight).__name__ == "Float8Tensor" and weight.qdata.dtype == torch.float8_e4m3fn
    original = AutoModelForCausalLM.from_pretrained(tiny_chat_model).model.layers[0].mlp.up_proj.weight
    assert torch.allclose(weight.dequantize().float(), original, rtol=0.07, atol=1e-3)  # e4m3: 3 mantissa bits
    generated = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > 3 and generated[0, :3].tolist() == [5, 6, 7]


def test_calibration_is_refused_where_unused(tiny_chat_model, tmp_path, capsys):
    assert main(["export", "--model", str(tiny_chat_model), "--quant", "fp8", "--calib", "x.jsonl",
                 "--output", str(tmp_path / "q")]) == 1
    assert "needs no calibration" in capsys.readouterr().err


def test_calibration_rows_are_rendered_like_training(tiny_chat_model, tmp_path):
    from megaswift.serve.loading import load_tokenizer
    from megaswift.serve.quantize import calibration_texts

    calib = tmp_path / "calib.jsonl"
    rows = [{"query": "Say hello.", "response": "Hello there, friend!"},
            {"query": "What is two plus two?", "response": "Four.", "system": "Be brief."}]
    calib.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = load_tokenizer(tiny_chat_model)
    texts = calibration_texts(str(calib), tokenizer)
    expected = [tokenizer.apply_chat_template(
        ([{"role": "system", "content": row["system"]}] if "system" in row else [])
        + [{"role": "user", "content": row["query"]}, {"role": "assistant", "content": row["response"]}],
        tokenize=False) for row in rows]
    assert texts == expected
    assert len(calibration_texts(None, tokenizer, samples=5)) == 5


@pytest.mark.parametrize("method, extra, expected", [
    ("gptq-int4", ["--group-size", "48"], "--group-size 48"),  # 48 divides neither 64 nor 128
    ("awq-int4", ["--group-size", "32"], "multiples of 64"),  # the tiny model's value projection is 32 wide
    ("gptq-int4", ["--group-size", "32", "--calib", "{tmp}/bad.jsonl"], "bad.jsonl:2"),
])
def test_bad_gptqmodel_input_is_refused_before_any_work(tiny_chat_model, tmp_path, capsys, method, extra,
                                                         expected):
    (tmp_path / "bad.jsonl").write_text('{"query": "a", "response": "b"}\n{"query": "a"}\n')
    extra = [arg.format(tmp=tmp_path) for arg in extra]
    out = tmp_path / "q"
    assert main(["export", "--model", str(tiny_chat_model), "--quant", method, "--output", str(out), *extra]) == 1
    assert expected in capsys.readouterr().err and not out.exists()
