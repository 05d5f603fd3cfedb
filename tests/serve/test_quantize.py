"""`megaswift export --quant`: bitsandbytes on CPU; the folder loads with transformers as it is and generates."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from megaswift.cli.main import main

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("method, layer, tolerance", [("bnb-int8", "Linear8bitLt", 0.05),
                                                      ("bnb-nf4", "Linear4bit", 0.5)])
def test_quantized_folder_loads_and_generates(tiny_chat_model, tmp_path, method, layer, tolerance):
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


def test_methods_not_offered_say_what_they_need(tiny_chat_model, tmp_path, capsys):
    assert main(["export", "--model", str(tiny_chat_model), "--quant", "gptq-int4",
                 "--output", str(tmp_path / "q")]) == 1
    assert "gptqmodel" in capsys.readouterr().err
