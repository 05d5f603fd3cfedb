"""Quantize an exported HF folder with a maintained library; report size on disk and perplexity before/after.

bitsandbytes (0.49+) has a CPU backend: `bnb-nf4` and `bnb-int8` run on CPU and on CUDA, and the folder they
write loads with `AutoModelForCausalLM.from_pretrained` as it is (transformers reads its quantization_config).
The other methods the issue names need libraries and GPUs this project does not install or test yet; asking
for them is an error that says what they need.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

BNB_METHODS = ("bnb-nf4", "bnb-int8")
NOT_OFFERED = {
    "gptq-int4": "GPTQ needs gptqmodel (or optimum + auto-gptq), a CUDA GPU and calibration data",
    "awq-int4": "AWQ needs llm-compressor or autoawq (archived) and a CUDA GPU",
    "fp8": "FP8 needs llm-compressor or torchao and a GPU with FP8 support (Hopper or newer) to run",
}
QUANT_METHODS = BNB_METHODS + tuple(NOT_OFFERED)


class QuantizationError(ValueError):
    pass


def _bnb_config(method: str):
    import torch
    from transformers import BitsAndBytesConfig

    if method == "bnb-nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return BitsAndBytesConfig(load_in_8bit=True)


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def held_out_text(path: str | None) -> str:
    """The text perplexity is measured on: a file's text (jsonl: its rows' text fields joined), or by
    default Python's own documentation topics from the second half (nothing to download)."""
    if path is None:
        from pydoc_data.topics import topics
        keys = sorted(topics)
        return "\n".join(topics[k] for k in keys[len(keys) // 2:])
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".jsonl"):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        text = "\n".join(str(v) for row in rows for v in row.values() if isinstance(v, str))
    return text


def perplexity(model, tokenizer, text: str, max_tokens: int = 2048, window: int = 256) -> float:
    """exp(mean next-token loss) over the first max_tokens tokens of text, in non-overlapping windows."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start:start + window]], device=device)
            if chunk.shape[1] < 2:
                break
            logits = model(input_ids=chunk).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
            total, count = total + loss.item(), count + chunk.shape[1] - 1
    return math.exp(total / count)


def quantize(model_dir: str | Path, method: str, output: str | Path, text_file: str | None = None,
             device: str | None = None) -> dict:
    """Write the quantized model (+ tokenizer) to `output` and quantization.json; returns the report."""
    if method in NOT_OFFERED:
        raise QuantizationError(f"--quant {method} is not offered yet: {NOT_OFFERED[method]}. On CPU use "
                                f"{' or '.join(BNB_METHODS)}")
    if method not in BNB_METHODS:
        raise QuantizationError(f"--quant: expected one of {list(QUANT_METHODS)}, found {method!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise QuantizationError(f"--quant {method} needs bitsandbytes: pip install 'bitsandbytes>=0.49'") from None
    import torch
    from transformers import AutoModelForCausalLM

    from megaswift.serve.loading import load_tokenizer

    model_dir, output = Path(model_dir), Path(output)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, text = load_tokenizer(model_dir), held_out_text(text_file)
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device)
    window = min(256, getattr(original.config, "max_position_embeddings", 256))
    before = perplexity(original, tokenizer, text, window=window)
    del original
    quantized = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=_bnb_config(method),
                                                     device_map=device)
    quantized.save_pretrained(output)
    tokenizer.save_pretrained(output)
    reloaded = AutoModelForCausalLM.from_pretrained(output, device_map=device)  # as users will load it
    report = {"method": method, "source": str(model_dir), "device": device,
              "bytes_before": weights_bytes(model_dir), "bytes_after": weights_bytes(output),
              "perplexity_before": round(before, 4),
              "perplexity_after": round(perplexity(reloaded, tokenizer, text, window=window), 4),
              "held_out": text_file or "pydoc_data.topics (second half)"}
    (output / "quantization.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
