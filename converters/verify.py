"""The verification gate: the converted model's logits must match transformers' own model.

megatron side: GPTModel at TP=1 (one process, gloo) loaded by megatron-core's own
`dist_checkpointing.load`, so the check also proves the checkpoint is loadable. HF side:
`AutoModelForCausalLM.from_pretrained`. Both in fp32 on a fixed token sequence. Results go to
`verification.json`; a failure raises VerificationError (the output stays in its temporary folder).
"""
import json
from pathlib import Path

import torch

from converters.errors import ConversionError

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
    except Exception as e:  # e.g. its CPU FP8 loader refuses edge blocks that do not divide a matrix
        raise VerificationError(f"{hf_dir}: transformers cannot load the model to verify against "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                f"convert with --no-verify to skip the logit check") from e
    model = model.float().eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def fits_in_memory(hf: dict, parameter_count: int) -> tuple[bool, str]:
    import psutil
    needed = 2 * 4 * parameter_count  # two fp32 models
    available = psutil.virtual_memory().available
    note = f"needs ~{needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"
    return needed < MEMORY_HEADROOM * available, note


def verify_conversion(hf: dict, hf_dir: Path, mcore_dir: Path, hf_dtype, tmp: Path, final: Path, direction: str,
                      forced: bool, coverage: dict, parameter_count: int | None = None) -> dict:
    report = {"direction": direction, "coverage": {**coverage, "passed": True}}
    fits, memory_note = fits_in_memory(hf, parameter_count or 0)
    if not forced and parameter_count is not None and not fits:
        report["logits"] = {"skipped": f"model too large to verify in memory ({memory_note}); pass --verify to force"}
    else:
        tokens = fixed_tokens(hf["vocab_size"])
        diff = (mcore_logits(hf, mcore_dir, tokens) - hf_logits(hf_dir, tokens, hf_dtype)).abs().max().item()
        report["logits"] = {"max_abs_diff": diff, "threshold": LOGITS_MAX_ABS_DIFF, "dtype": "float32",
                            "input": f"{SEQUENCE_LENGTH} tokens from torch.randint(seed={INPUT_SEED})",
                            "passed": diff <= LOGITS_MAX_ABS_DIFF}
    report["passed"] = report["logits"].get("passed", True)
    (tmp / "verification.json").write_text(json.dumps(report, indent=2))
    if not report["passed"]:
        raise VerificationError(f"{direction} verification failed: max |logits diff| = "
                                f"{report['logits']['max_abs_diff']:.3g} > {LOGITS_MAX_ABS_DIFF} "
                                f"(megatron-core vs transformers, fp32); output left unfinished in {tmp}, "
                                f"not moved to {final}; see {tmp / 'verification.json'}")
    return report
