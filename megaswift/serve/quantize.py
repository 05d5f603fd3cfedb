"""Quantize an exported HF folder with a maintained library; report size on disk and perplexity before/after.

- `bnb-nf4`, `bnb-int8`: bitsandbytes (0.49+ has a CPU backend), CPU or CUDA, no calibration.
- `gptq-int4`, `awq-int4`: GPT-QModel (gptqmodel, with optimum for transformers' GPTQ loader), CPU or CUDA,
  calibrated on text: `--calib` (an SFT jsonl, rendered with the model's chat template as `megaswift sft`
  renders it) or by default the first half of Python's documentation topics (perplexity uses the second).
- `fp8`: torchao's float8 (e4m3) weight-only quantization with a scale per output row, through transformers'
  TorchAoConfig, CPU or CUDA, no calibration. (llm-compressor pins an older torch and transformers;
  gptqmodel's own FP8 folders store the inverse of the scale transformers multiplies by, so transformers
  would load them wrong.)

Every folder written loads with `AutoModelForCausalLM.from_pretrained` as it is (transformers reads its
quantization_config); the reload measured for the report is that load.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path

BNB_METHODS = ("bnb-nf4", "bnb-int8")
GPTQMODEL_METHODS = ("gptq-int4", "awq-int4")
TORCHAO_METHODS = ("fp8",)
QUANT_METHODS = BNB_METHODS + GPTQMODEL_METHODS + TORCHAO_METHODS
DEFAULT_GROUP_SIZE = 128
DEFAULT_CALIB_SAMPLES = 128
CALIB_CHARS = 2048  # one calibration sample: about a window of perplexity text


class QuantizationError(ValueError):
    pass


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def _pydoc_topics(half: int) -> list[str]:
    """Python's documentation topics (nothing to download), first (0) or second (1) half: calibration and
    held-out text never overlap."""
    from pydoc_data.topics import topics
    keys = sorted(topics)
    keys = keys[:len(keys) // 2] if half == 0 else keys[len(keys) // 2:]
    return [topics[k] for k in keys]


def held_out_text(path: str | None) -> str:
    """The text perplexity is measured on: a file's text (jsonl: its rows' text fields joined), or by
    default Python's own documentation topics from the second half (nothing to download)."""
    if path is None:
        return "\n".join(_pydoc_topics(1))
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".jsonl"):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        text = "\n".join(str(v) for row in rows for v in row.values() if isinstance(v, str))
    return text


def calibration_texts(path: str | None, tokenizer, samples: int = DEFAULT_CALIB_SAMPLES) -> list[str]:
    """Up to `samples` texts to calibrate GPTQ/AWQ on. A jsonl of SFT rows (messages / swift / alpaca /
    sharegpt, see megaswift.data.sft.formats) is rendered with the tokenizer's chat template exactly as
    training renders it, so the activations seen are those of the fine-tuned task; a .txt file is cut
    into pieces; by default the first half of Python's documentation topics."""
    if path is None:
        text = "\n".join(_pydoc_topics(0))
    elif not Path(path).is_file():
        raise QuantizationError(f"--calib {path}: no such file; expected an SFT .jsonl or a .txt file")
    else:
        text = Path(path).read_text(encoding="utf-8")
    if path is None or not path.endswith(".jsonl"):
        pieces = [text[i:i + CALIB_CHARS] for i in range(0, len(text), CALIB_CHARS)]
        return [p for p in pieces if p.strip()][:samples]
    from megaswift.data.sft.formats import detect_format, location, normalise_row
    from megaswift.data.sft.template import SFTTemplate

    template, texts, format_name = SFTTemplate(tokenizer), [], None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = location(path, number)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise QuantizationError(f"--calib {where}: expected one JSON object per line, found invalid JSON "
                                    f"({err.msg})") from None
        format_name = format_name or detect_format(row, where)
        sample = normalise_row(row, format_name, where)
        texts.append(template.render(sample["messages"], sample.get("tools")))
        if len(texts) == samples:
            break
    if not texts:
        raise QuantizationError(f"--calib {path}: expected SFT rows, found an empty file")
    return texts


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


# ---- bitsandbytes ---------------------------------------------------------------------------------------

def _bnb_config(method: str):
    import torch
    from transformers import BitsAndBytesConfig

    if method == "bnb-nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return BitsAndBytesConfig(load_in_8bit=True)


def _write_bnb(model_dir: Path, method: str, output: Path, device: str) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise QuantizationError(f"--quant {method} needs bitsandbytes: pip install 'bitsandbytes>=0.49' "
                                f"(or megaswift[quant])") from None
    from transformers import AutoModelForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=_bnb_config(method),
                                                     device_map=device)
    quantized.save_pretrained(output)


# ---- torchao: FP8 --------------------------------------------------------------------------------------

def _write_torchao_fp8(model_dir: Path, output: Path, device: str) -> None:
    try:
        from torchao.quantization import Float8WeightOnlyConfig
    except ImportError:
        raise QuantizationError("--quant fp8 needs torchao: pip install 'torchao>=0.18' (or megaswift[quant])") \
            from None
    from transformers import AutoModelForCausalLM, TorchAoConfig

    # weight-only: FP8 weights (half of bf16 on disk and in memory), matmuls in the model's dtype, so it runs
    # on any device; FP8 activations would need FP8 matmul kernels (CUDA compute capability >= 8.9)
    quantized = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", device_map=device,
                                                     quantization_config=TorchAoConfig(Float8WeightOnlyConfig()))
    quantized.save_pretrained(output)


# ---- GPT-QModel: GPTQ and AWQ ---------------------------------------------------------------------------

@contextlib.contextmanager
def _gptqmodel_cpu_workers():
    """gptqmodel 7.7 sizes its CPU thread pool at (cores + 1) // 2 but asks for 2 model-loader workers, so on a
    machine with fewer than 4 cores GPTQModel.load fails ("requests 2 workers but parent 'cpu' only has 1");
    its GPTQMODEL_CPU_WORKERS override raises the pool to 2. It is set only while gptqmodel works, and the
    caller's environment is restored afterwards."""
    saved = os.environ.get("GPTQMODEL_CPU_WORKERS")
    if (os.cpu_count() or 1) < 4 and saved is None:
        os.environ["GPTQMODEL_CPU_WORKERS"] = "2"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("GPTQMODEL_CPU_WORKERS", None)


def _import_gptqmodel(method: str):
    try:
        import gptqmodel
        import optimum  # noqa: F401  transformers loads GPTQ folders through optimum.gptq
    except ImportError as err:
        raise QuantizationError(f"--quant {method} needs gptqmodel and optimum: pip install 'gptqmodel>=7.7' "
                                f"'optimum>=2.3' (or megaswift[quant]); missing: {err.name}") from None
    return gptqmodel


AWQ_OUT_MULTIPLE = 64  # gptqmodel's AWQ clip search walks output rows in batches of 64 (or 256)


def check_layer_sizes(config: dict, group_size: int, method: str) -> None:
    """GPTQ/AWQ quantize each linear layer's input dimension in groups: the group size must divide it. AWQ
    also searches clipping per block of output rows: v/o/gate/up/down projections' outputs must be multiples
    of 64 (gptqmodel asserts it mid-run otherwise)."""
    dims = {k: config[k] for k in ("hidden_size", "intermediate_size") if isinstance(config.get(k), int)}
    # -1: one group per output row, whatever the input size (what the error below suggests when none fits)
    bad = {} if group_size == -1 else {k: v for k, v in dims.items() if group_size <= 0 or v % group_size}
    if bad:
        fits = [g for g in (128, 64, 32, 16) if all(v % g == 0 for v in dims.values())]
        raise QuantizationError(f"--group-size {group_size}: {method} needs a group size dividing the linear "
                                f"layers' input sizes {dims}; found it does not divide {bad}. "
                                f"Use --group-size {fits[0] if fits else -1}")
    if method == "awq-int4":
        heads = config.get("num_attention_heads") or 1
        head_dim = config.get("head_dim") or dims.get("hidden_size", 0) // heads
        outs = dict(dims, value_projection=(config.get("num_key_value_heads") or heads) * head_dim)
        bad = {k: v for k, v in outs.items() if v % AWQ_OUT_MULTIPLE}
        if bad:
            raise QuantizationError(f"--quant awq-int4: expected layer output sizes that are multiples of "
                                    f"{AWQ_OUT_MULTIPLE} (gptqmodel's AWQ clip search), found {bad}; use "
                                    f"--quant gptq-int4 for this model")


def _write_gptqmodel(model_dir: Path, method: str, output: Path, device: str, texts: list[str], tokenizer,
                     group_size: int) -> None:
    # gptqmodel writes a per-layer log into ./logs of whatever the working directory is; those files are
    # moved into the output folder so that the user's working directory is left as it was.
    logs = Path("logs")
    had_logs, before = logs.is_dir(), set(logs.iterdir()) if logs.is_dir() else set()
    try:
        with _gptqmodel_cpu_workers():
            _quantize_with_gptqmodel(_import_gptqmodel(method), model_dir, method, output, device, texts, tokenizer,
                                     group_size)
    finally:
        new_logs = sorted(set(logs.iterdir()) - before) if logs.is_dir() else []
        if new_logs and output.is_dir():
            (output / "quantization_logs").mkdir(exist_ok=True)
            for file in new_logs:
                shutil.move(file, output / "quantization_logs" / file.name)
        if not had_logs and logs.is_dir() and not any(logs.iterdir()):
            logs.rmdir()
    # gptqmodel rewrites generation_config.json (turning sampling on); the quantized model keeps the source's
    generation = model_dir / "generation_config.json"
    if generation.is_file():
        (output / "generation_config.json").write_text(generation.read_text())


def _quantize_with_gptqmodel(gptqmodel, model_dir: Path, method: str, output: Path, device: str, texts: list[str],
                             tokenizer, group_size: int) -> None:
    config_class = gptqmodel.GPTQConfig if method == "gptq-int4" else gptqmodel.AWQConfig
    # pack_impl="original": the pure-torch packer; "auto" JIT-compiles a C++ extension on CPU (minutes)
    # to save seconds of packing on a small model
    config = config_class(bits=4, group_size=group_size, pack_impl="original")
    model = gptqmodel.GPTQModel.load(str(model_dir), config, device=device)
    model.quantize(texts, batch_size=1, tokenizer=tokenizer)
    model.save(str(output))


def load_quantized(folder: str | Path, device: str):
    """The quantized folder as users load it: `AutoModelForCausalLM.from_pretrained(folder)`. On CPU a GPTQ/AWQ
    folder is read with gptqmodel's pure-torch kernel, as its default CPU kernels compile a C++ extension on
    first use (minutes on a small machine); the folder itself is unchanged."""
    from transformers import AutoModelForCausalLM

    config = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config", {})
    kind = config.get("quant_method")
    if device == "cpu" and kind in ("gptq", "awq"):
        from transformers import AwqConfig, GPTQConfig
        override = (GPTQConfig(bits=config["bits"], backend="gptq_torch") if kind == "gptq"
                    else AwqConfig(bits=config["bits"], backend="torch_awq"))
        with _gptqmodel_cpu_workers():
            return AutoModelForCausalLM.from_pretrained(folder, device_map=device, quantization_config=override)
    return AutoModelForCausalLM.from_pretrained(folder, device_map=device)


def quantize(model_dir: str | Path, method: str, output: str | Path, text_file: str | None = None,
             device: str | None = None, calib_file: str | None = None, group_size: int = DEFAULT_GROUP_SIZE,
             calib_samples: int = DEFAULT_CALIB_SAMPLES) -> dict:
    """Write the quantized model (+ tokenizer) to `output` and quantization.json; returns the report."""
    if method not in QUANT_METHODS:
        raise QuantizationError(f"--quant: expected one of {list(QUANT_METHODS)}, found {method!r}")
    if method not in GPTQMODEL_METHODS and calib_file:
        raise QuantizationError(f"--calib: {method} needs no calibration data; it is for "
                                f"{' and '.join(GPTQMODEL_METHODS)}")
    import torch
    from transformers import AutoModelForCausalLM

    from megaswift.serve.loading import load_tokenizer

    model_dir, output = Path(model_dir), Path(output)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, text = load_tokenizer(model_dir), held_out_text(text_file)
    texts = None
    if method in GPTQMODEL_METHODS:  # fail before minutes of work
        check_layer_sizes(json.loads((model_dir / "config.json").read_text()), group_size, method)
        texts = calibration_texts(calib_file, tokenizer, calib_samples)
        _import_gptqmodel(method)
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device)
    window = min(256, getattr(original.config, "max_position_embeddings", 256))
    before = perplexity(original, tokenizer, text, window=window)
    del original
    if method in BNB_METHODS:
        _write_bnb(model_dir, method, output, device)
    elif method in TORCHAO_METHODS:
        _write_torchao_fp8(model_dir, output, device)
    else:
        _write_gptqmodel(model_dir, method, output, device, texts, tokenizer, group_size)
    tokenizer.save_pretrained(output)
    reloaded = load_quantized(output, device)
    report = {"method": method, "source": str(model_dir), "device": device,
              "bytes_before": weights_bytes(model_dir), "bytes_after": weights_bytes(output),
              "perplexity_before": round(before, 4),
              "perplexity_after": round(perplexity(reloaded, tokenizer, text, window=window), 4),
              "held_out": text_file or "pydoc_data.topics (second half)"}
    if texts is not None:
        report.update(calibration=calib_file or "pydoc_data.topics (first half)", calibration_samples=len(texts),
                      group_size=group_size)
    (output / "quantization.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
