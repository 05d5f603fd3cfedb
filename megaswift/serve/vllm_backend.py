"""`megaswift deploy --backend vllm`: a thin hand-over to vLLM's own OpenAI-compatible server.

vLLM is CUDA-only and not installed on any machine here, so this backend is not exercised in CI. It builds
one command and replaces the megaswift process with it (so SIGTERM, batching, streaming and errors are vLLM's):

    python -m vllm.entrypoints.openai.api_server --model DIR --served-model-name NAME --host H --port P
        [--api-key KEY] [--dtype D] --max-num-seqs N
        [--enable-lora --lora-modules a=DIR b=DIR --max-lora-rank R --max-loras K]
        --enable-auto-tool-choice --tool-call-parser hermes

Rendering is the same as training: vLLM applies the chat template saved in the exported folder (the one
`megaswift sft` rendered with); tool calls are parsed by vLLM's Hermes parser, the `<tool_call>{json}</tool_call>`
format of the Qwen templates and of megaswift's agent data. Adapters are served by name without merging, as
megaswift's own server does; vLLM refuses adapters whose rank exceeds --max-lora-rank, so it is set to the
smallest rank vLLM accepts that holds the largest of them.

Before handing over, the model folder and every adapter are checked as vLLM checks them when it loads
(vllm_checks.py), so a folder vLLM would refuse fails at once, on any machine, naming the file and the fix.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


class VLLMUnavailable(RuntimeError):
    """vLLM is not installed (it needs a CUDA machine)."""


def require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise VLLMUnavailable("--backend vllm: vLLM is not installed; it runs on CUDA machines only (pip install "
                              "vllm there). On this machine use --backend transformers (the default).") from None


# the ranks vLLM's --max-lora-rank accepts (its argument choices); an adapter of rank r needs the next one up
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def adapter_rank(folder: str | Path) -> int:
    """The largest rank in the adapter: r, or a larger per-module rank_pattern value."""
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    return max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])


def max_lora_rank(adapters: dict[str, str]) -> int:
    rank = max(adapter_rank(folder) for folder in adapters.values())
    allowed = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not allowed:
        raise VLLMUnavailable(f"--adapters: rank {rank} is above the largest rank vLLM serves ({VLLM_LORA_RANKS[-1]})")
    return allowed[0]


def vllm_command(model_dir: str | Path, name: str, adapters: dict[str, str], host: str, port: int,
                 api_key: str | None, dtype: str, max_batch_size: int) -> list[str]:
    """The command that serves `model_dir` (and `adapters`) with vLLM; VLLMLoadError first when vLLM would
    refuse to load any of them."""
    from megaswift.serve.vllm_checks import check_for_vllm

    check_for_vllm(model_dir, adapters)
    command = [sys.executable, "-m", VLLM_SERVER_MODULE, "--model", str(model_dir), "--served-model-name", name,
               "--host", host, "--port", str(port), "--dtype", dtype, "--max-num-seqs", str(max_batch_size),
               "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    if api_key:
        command += ["--api-key", api_key]
    if adapters:
        command += ["--enable-lora", "--lora-modules", *(f"{n}={folder}" for n, folder in adapters.items()),
                    "--max-lora-rank", str(max_lora_rank(adapters)),
                    "--max-loras", str(len(adapters))]
    return command

