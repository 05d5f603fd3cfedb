"""HF config dict -> megatron-core `TransformerConfig` + the `GPTModel` constructor arguments.

The model's family (megaswift/models/families/) maps its typed view of the HF config to the model's
own fields (sizes, activation, norm, bias, rope, MoE routing); this module adds what every model shares:
parallelism, precision, fusions and the padded vocabulary. The HF config stays the single description
of a model: it is recorded in every checkpoint, and `mcore2hf` writes it back unchanged, so no reverse
mapping of sizes is needed.
"""
import torch
from megatron.core.transformer import TransformerConfig

from megaswift.config import ParallelConfig
from megaswift.models.families import family_of

VOCAB_DIVISIBLE_BY = 128  # pad the vocab like Megatron does, so embedding shards stay aligned


def padded_vocab_size(vocab_size: int, tensor_parallel: int) -> int:
    multiple = VOCAB_DIVISIBLE_BY * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def hf_to_transformer_config(hf: dict, parallel: ParallelConfig, params_dtype: torch.dtype = torch.float32,
                             moe_token_dispatcher: str = "alltoall", init_std: float | None = None,
                             on_gpu: bool = False) -> TransformerConfig:
    family = family_of(hf)
    view = family.read(hf)
    return TransformerConfig(
        **family.transformer_fields(view),
        init_method_std=init_std if init_std is not None else view.init_std,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        context_parallel_size=parallel.context,
        expert_model_parallel_size=parallel.expert,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        # Fusions need apex / TE / CUDA; off on CPU, megatron-core's own choices on GPU.
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        calculate_per_token_loss=True,  # loss = sum over tokens / tokens, exact across micro-batches and DP
        moe_token_dispatcher_type=moe_token_dispatcher,
    )


def gpt_model_kwargs(hf: dict, tensor_parallel: int) -> dict:
    """The `GPTModel` arguments that come from the HF config rather than from TransformerConfig."""
    family = family_of(hf)
    view = family.read(hf)
    return {
        "vocab_size": padded_vocab_size(view.vocab_size, tensor_parallel),
        "max_sequence_length": view.max_position_embeddings,
        "share_embeddings_and_output_weights": view.tied_embeddings,
        **family.model_kwargs(view),
    }
