"""Known notices that megatron-core and torch print on every run, once per rank, in place of none.

Each known notice is either dropped (nothing a user can act on: deprecations inside the libraries we call,
CUDA hints on a machine without CUDA) or said once, by rank 0, in one line of our own. Every other warning
and log record shows as usual. Only the `megaswift` entry point installs this (cli/main.py): the filters are
process-wide, and library calls (converters.hf2mcore, Trainer) never change the caller's process.
"""
import logging
import os
import sys
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Notice:
    text: str               # a substring of the warning or log message
    cpu: str | None = None  # on a machine without CUDA: None (dropped) or what rank 0 says once instead
    gpu: str | None = None  # the same with CUDA


TE_APEX = ("megatron-core uses its torch fallbacks: Transformer Engine and Apex are not installed (slower on GPUs; "
           "`megaswift doctor` shows what is installed)")
SEQUENCE_PARALLEL_CONNECTIONS = ("with sequence parallelism, set CUDA_DEVICE_MAX_CONNECTIONS=1 in the environment "
                                 "of every process for speed (megatron-core's advice)")

KNOWN = (
    # expected on CPU, where megaswift uses megatron-core's local spec; worth one line on a GPU machine
    Notice("Transformer Engine and Apex are not installed", gpu=TE_APEX),
    Notice("Apex is not installed. Falling back to Torch Norm", gpu=TE_APEX),
    Notice("When using sequence parallelism it is recommended to set the environment variable "
           "CUDA_DEVICE_MAX_CONNECTIONS", gpu=SEQUENCE_PARALLEL_CONNECTIONS),
    Notice("No CUDA runtime is found"),                # torch.utils.cpp_extension on a CPU-only machine
    # inside megatron-core / torch, nothing for a user to change
    Notice("GPTModel IS DEPRECATED"),                  # still the supported GPT path in megatron-core 0.19
    Notice("MCore's async save is deprecated"),        # printed even for synchronous saves
    Notice("full scope is deprecated"),                # raised by megatron-core's own TransformerConfig defaults
    Notice("MimoModelConfig is experimental"),         # an import side effect; we do not use MiMo
    Notice("Please use DTensor instead and we are deprecating ShardedTensor"),  # dist_checkpointing's format
    Notice("The argument order of load has been changed"),  # dist_checkpointing calls torch's dcp.load
    # dist_checkpointing reads a checkpoint's common part with torch's dcp without a process group, on purpose
    Notice("torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a "
           "single process"),
    # a one-process conversion writes its checkpoint with torch's dcp.save(no_dist=True), which says so anyway
    Notice("torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to save in a "
           "single process"),
    Notice("`torch.distributed.reduce_scatter_tensor` is deprecated"),    # megatron-core's collectives
    Notice("`torch.distributed.all_gather_into_tensor` is deprecated"),
    Notice("`torch.distributed._reduce_scatter_base` is"),
    Notice("`torch.distributed._all_gather_base` is"),
    # addressed to megatron-core's callers (megaswift), about how DDP computes its buffer layout
    Notice("full_param_layout not provided with use_distributed_optimizer=True"),
    # a one-process run (no RANK): megatron-core then takes rank 0, which is right
    Notice("Could not determine rank from torch.distributed, RANK, or SLURM_PROCID"),
    # the distributed optimizer's zero_grad reads .grad of its shard views, which are not leaves
    Notice("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed"),
    # megatron-core's torch norm in bf16 keeps fp32 weights: torch takes its unfused path
    Notice("Mismatch dtype between input and weight"),
)

# Loggers that emit known notices; a filter on a logger sees only its own records, not its children's.
NOISY_LOGGERS = ("megatron", "megatron.core.models.gpt.gpt_model", "megatron.core.dist_checkpointing.strategies.torch",
                 "megatron.core.transformer.transformer_config", "megatron.core.distributed.distributed_data_parallel",
                 "torch.utils.cpp_extension")


def _on_gpu() -> bool:
    """Asked at the first notice, by when torch is imported (the notices come from torch and megatron-core)."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available())


class KnownNotices(logging.Filter):
    """Decides, for one message, whether it shows as usual (not a known notice) and says a known one's
    line once on rank 0. Used both as the warnings hook and as a logging filter."""

    def __init__(self, rank0: bool, stream=None):
        super().__init__()
        self.rank0, self.stream = rank0, stream
        self.said: set[str] = set()

    def shows(self, message: str) -> bool:
        notice = next((n for n in KNOWN if n.text in message), None)
        if notice is None:
            return True
        line = notice.gpu if _on_gpu() else notice.cpu
        if line and self.rank0 and line not in self.said:
            self.said.add(line)
            (self.stream or sys.stderr).write(f"megaswift: note: {line}\n")
        return False

    def filter(self, record: logging.LogRecord) -> bool:
        return self.shows(record.getMessage())


def silence_known_noise() -> None:
    """Installs the filter for this process (the `megaswift` entry point only)."""
    notices = KnownNotices(rank0=int(os.environ.get("RANK", "0")) == 0)
    show_warning = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if notices.shows(str(message)):
            show_warning(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    for handler in [*logging.getLogger().handlers, logging.lastResort]:
        if handler is not None:
            handler.addFilter(notices)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).addFilter(notices)
