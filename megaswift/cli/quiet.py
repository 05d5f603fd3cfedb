"""Silence the start-up notices megatron-core prints on every run that users cannot act on.

Only these exact notices are dropped; every other warning and log record still shows.
"""
import logging
import warnings

NOISE = (
    "Transformer Engine and Apex are not installed",  # expected on CPU: we use the local spec
    "Apex is not installed. Falling back to Torch Norm",
    "GPTModel IS DEPRECATED",                          # still the supported GPT path in megatron-core 0.19
    "MCore's async save is deprecated",                # printed even for synchronous saves
    "full scope is deprecated",                        # raised by megatron-core's own TransformerConfig defaults
    "MimoModelConfig is experimental",                 # an import side effect; we do not use MiMo
    "No CUDA runtime is found",                        # torch.utils.cpp_extension on a CPU-only machine
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in NOISE)


def silence_known_noise() -> None:
    for text in NOISE:
        warnings.filterwarnings("ignore", message=f".*{text}.*")
    noise_filter = _DropNoise()
    for handler in logging.getLogger().handlers or []:
        handler.addFilter(noise_filter)
    logging.getLogger("megatron").addFilter(noise_filter)
    for name in ("megatron.core.models.gpt.gpt_model", "megatron.core.dist_checkpointing.strategies.torch",
                 "torch.utils.cpp_extension"):
        logging.getLogger(name).addFilter(noise_filter)
