"""The verification gate: the converted model's logits must match transformers' own model.

megatron side: GPTModel at TP=1 (one process, gloo) loaded by megatron-core's own
`dist_checkpointing.load`, so the check also proves the checkpoint is loadable. HF side:
`AutoModelForCausalLM.from_pretrained`. Both in fp32 on a fixed token sequence. Results go to
`verification.json`; a failure raises VerificationError (the output stays in its temporary folder).
"""
import json
import shutil
from pathlib import Path

import torch

from converters.errors import ConversionError
from converters.fp8 import Fp8Dequantization
from converters.hf_reader import HfCheckpointReader

LOGITS_MAX_ABS_DIFF = 1e-4
SEQUENCE_LENGTH = 32
INPUT_SEED = 0
MEMORY_HEADROOM = 0.7  # verify automatically only when both fp32 models use < 70% of available memory


class VerificationError(ConversionError):
    pass


def fixed_tokens(vocab_size: int, length: int = SEQUENCE_LENGTH) -> torch.Tensor:
    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(INPUT_SEED))


def mcore_logits(hf: dict, ckpt_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from megatron.core import dist_checkpointing

    from converters.process_group import single_process_model_parallel
    from megaswift.config import ParallelConfig
    from megaswift.models import hf_to_transformer_config
    from megaswift.models.builder import build_model_chunks

    with single_process_model_parallel():
        config = hf_to_transformer_config(hf, ParallelConfig(), params_dtype=torch.float32)
        config.perform_initialization = False
        (model,) = build_model_chunks(hf, config)
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt_dir))
        model.load_state_dict(loaded["model"], strict=True)
        model.eval()
        position_ids = torch.arange(tokens.shape[1]).unsqueeze(0)
        with torch.no_grad():
            logits = model(tokens, position_ids, None)
    return logits[..., : hf["vocab_size"]].float()


def hf_logits(hf_dir: Path, tokens: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`dtype`: the dtype the weights were converted to (rounded the same way), then run in fp32."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype or "auto")
    except Exception as e:
        raise VerificationError(f"{hf_dir}: transformers cannot load the model to verify against "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                f"convert with --no-verify to skip the logit check") from e
    model = model.float().eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def has_partial_fp8_blocks(reader: HfCheckpointReader, fp8: Fp8Dequantization) -> bool:
    """Whether some FP8 weight's shape is not a multiple of the block size (DeepSeek-V3's 576-row kv_a_proj is
    4.5 blocks of 128). transformers' CPU FP8 loader derives the tile size from the scale grid, rows // scale
    rows, so it refuses such a weight ("not divisible by scale grid"), although the checkpoint is valid."""
    return any(dim % block for key in reader.scale_of for dim, block in zip(reader.shape(key), fp8.block))


def write_dequantized_copy(hf_dir: Path, reader: HfCheckpointReader, copy: Path) -> Path:
    """The FP8 folder as ordinary weights, dequantized by the reference formula (converters/fp8.py, itself
    checked against a dequantization by hand), one weight file at a time, with its config minus
    quantization_config: what transformers loads to verify against when its FP8 loader cannot."""
    from safetensors.torch import save_file

    copy.mkdir()
    by_file = {}
    for key in reader.keys():
        by_file.setdefault(reader.file_of[key].name, []).append(key)
    for name, keys in by_file.items():
        save_file({key: reader.read(key).contiguous() for key in keys}, copy / f"{Path(name).stem}.safetensors",
                  metadata={"format": "pt"})
    if len(by_file) > 1:
        index = {"metadata": {}, "weight_map": {key: f"{Path(name).stem}.safetensors"
                                                for name, keys in by_file.items() for key in keys}}
        (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((hf_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def fp8_reference_logits(hf_dir: Path, fp8: Fp8Dequantization, tokens: torch.Tensor, scratch: Path,
                         dtype: torch.dtype | None) -> tuple[torch.Tensor, str]:
    """transformers' logits for an FP8 folder, and how its weights were loaded. Its own FP8 loader where it
    applies (an independent dequantization); else a dequantized copy in `scratch`, removed afterwards."""
    reader = HfCheckpointReader(hf_dir, fp8)  # the headers, read once for both questions
    try:
        if not has_partial_fp8_blocks(reader, fp8):
            return hf_logits(hf_dir, tokens, dtype), "transformers' FP8 loader"
        copy = scratch / "fp8-dequantized"
        try:
            return (hf_logits(write_dequantized_copy(hf_dir, reader, copy), tokens, dtype),
                    "dequantized by the reference formula (transformers' CPU FP8 loader refuses blocks that do not "
                    "divide a weight)")
        finally:
            shutil.rmtree(copy, ignore_errors=True)
    finally:
        reader.close()


def fits_in_memory(hf: dict, parameter_count: int) -> tuple[bool, str]:
    import psutil
    needed = 2 * 4 * parameter_count  # two fp32 models
    available = psutil.virtual_memory().available
    note = f"needs ~{needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"
    return needed < MEMORY_HEADROOM * available, note


def verify_conversion(hf: dict, hf_dir: Path, mcore_dir: Path, hf_dtype, tmp: Path, final: Path, direction: str,
                      forced: bool, coverage: dict, parameter_count: int | None = None,
                      fp8: Fp8Dequantization | None = None) -> dict:
    """`fp8`: how `hf_dir`'s FP8 weights were dequantized (hf2mcore of an FP8 folder)."""
    report = {"direction": direction, "coverage": {**coverage, "passed": True}}
    fits, memory_note = fits_in_memory(hf, parameter_count or 0)
    if not forced and parameter_count is not None and not fits:
        report["logits"] = {"skipped": f"model too large to verify in memory ({memory_note}); pass --verify to force"}
    else:
        tokens = fixed_tokens(hf["vocab_size"])
        if fp8 is None:
            reference, loaded = hf_logits(hf_dir, tokens, hf_dtype), None
        else:
            reference, loaded = fp8_reference_logits(hf_dir, fp8, tokens, tmp, hf_dtype)
        diff = (mcore_logits(hf, mcore_dir, tokens) - reference).abs().max().item()
        report["logits"] = {"max_abs_diff": diff, "threshold": LOGITS_MAX_ABS_DIFF, "dtype": "float32",
                            "input": f"{SEQUENCE_LENGTH} tokens from torch.randint(seed={INPUT_SEED})",
                            "passed": diff <= LOGITS_MAX_ABS_DIFF,
                            **({"fp8_weights": loaded} if loaded else {})}
    report["passed"] = report["logits"].get("passed", True)
    (tmp / "verification.json").write_text(json.dumps(report, indent=2))
    if not report["passed"]:
        raise VerificationError(f"{direction} verification failed: max |logits diff| = "
                                f"{report['logits']['max_abs_diff']:.3g} > {LOGITS_MAX_ABS_DIFF} "
                                f"(megatron-core vs transformers, fp32); output left unfinished in {tmp}, "
                                f"not moved to {final}; see {tmp / 'verification.json'}")
    return report
