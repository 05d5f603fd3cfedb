"""HF config dict -> megatron-core `TransformerConfig` + the `GPTModel` constructor arguments.

The model's family (megaswift/models/families/) maps its typed view of the HF config to the model's
own fields (sizes, activation, norm, bias, rope, MoE routing); this module adds what every model shares:
parallelism, precision, the performance settings (`perf`: recompute, fusions, MoE kernels), the padded
vocabulary, and last the `megatron` pass-through. The HF config stays the single description of a model:
it is recorded in every checkpoint, and `mcore2hf` writes it back unchanged, so no reverse mapping of sizes
is needed.
"""
import importlib.util
from dataclasses import dataclass

import torch
from megatron.core.transformer import MLATransformerConfig, TransformerConfig

from megaswift.config import ParallelConfig
from megaswift.config.sections import PerformanceConfig
from megaswift.config.validate import layers_per_stage
from megaswift.models.families import family_of

VOCAB_DIVISIBLE_BY = 128  # pad the vocab like Megatron does, so embedding shards stay aligned

# TransformerConfig / DDP fields megaswift sets from one of its own flags: `--megatron.FIELD` is refused
# with the flag to use instead (config/validate.py).
FLAG_OF_FIELD = {
    "tensor_model_parallel_size": "--parallel.tensor", "pipeline_model_parallel_size": "--parallel.pipeline",
    "virtual_pipeline_model_parallel_size": "--parallel.virtual_pipeline",
    "context_parallel_size": "--parallel.context", "expert_model_parallel_size": "--parallel.expert",
    "sequence_parallel": "--parallel.sequence_parallel",
    "use_distributed_optimizer": "--parallel.distributed_optimizer",
    "params_dtype": "--train.precision", "pipeline_dtype": "--train.precision", "bf16": "--train.precision",
    "fp16": "--train.precision", "init_method_std": "--model.init_std",
    "moe_token_dispatcher_type": "--model.moe_token_dispatcher",
    "recompute_granularity": "--perf.recompute", "recompute_method": "--perf.recompute_method",
    "recompute_num_layers": "--perf.recompute_num_layers", "recompute_modules": "--perf.recompute_modules",
    "overlap_grad_reduce": "--perf.overlap_grad_reduce", "overlap_param_gather": "--perf.overlap_param_gather",
    "bucket_size": "--perf.bucket_size", "bias_activation_fusion": "--perf.bias_activation_fusion",
    "bias_dropout_fusion": "--perf.bias_dropout_fusion", "masked_softmax_fusion": "--perf.masked_softmax_fusion",
    "apply_rope_fusion": "--perf.apply_rope_fusion",
    "gradient_accumulation_fusion": "--perf.gradient_accumulation_fusion",
    "cross_entropy_loss_fusion": "--perf.cross_entropy_loss_fusion", "moe_grouped_gemm": "--perf.moe_grouped_gemm",
    "overlap_moe_expert_parallel_comm": "--perf.moe_dispatch_overlap",
    # Set by megaswift itself, for correctness (no flag changes them).
    "calculate_per_token_loss": "megaswift itself: its loss is the per-token mean over the whole global batch",
    "batch_p2p_comm": "megaswift itself: batched p2p on gloo gives wrong interleaved-pipeline results",
    "overlap_p2p_comm": "megaswift itself: batched p2p on gloo gives wrong interleaved-pipeline results",
    "grad_reduce_in_fp32": "megaswift itself: gradients are reduced in fp32",
    "average_in_collective": "megaswift itself: per-token loss needs gradient sums, not averages",
    "use_cpu_initialization": "megaswift itself: weights are initialised on the CPU unless a GPU is present",
}


GRAD_ACCUM_KERNEL = "fused_weight_gradient_mlp_cuda"  # Apex's extension megatron-core's linear layers import


@dataclass(frozen=True)
class Accelerators:
    """What the fused paths need and this machine has."""
    gpu: bool
    transformer_engine: bool  # Transformer Engine imports (with a GPU)
    te_layers: bool  # the run's layer spec is Transformer Engine's
    grad_accum_kernel: bool  # Apex's fused_weight_gradient_mlp_cuda imports (megatron-core's linear layers need it)


def detect_accelerators(layer_spec: str = "auto") -> Accelerators:
    """What this machine has, for a run whose model.layer_spec is `layer_spec`. Tries to import Transformer
    Engine (uncached when it fails): a run detects once (Trainer) and passes the result down."""
    from megaswift.models.builder import resolve_layer_spec, transformer_engine_available
    gpu = torch.cuda.is_available()
    te = transformer_engine_available()
    return Accelerators(gpu=gpu, transformer_engine=te, te_layers=resolve_layer_spec(layer_spec, te) == "te",
                        grad_accum_kernel=gpu and importlib.util.find_spec(GRAD_ACCUM_KERNEL) is not None)


# Each fusion: whether the GPU path supports it here (the default when perf leaves it unset), and the
# reason it cannot be turned on otherwise.
FUSIONS = {
    "bias_activation_fusion": (lambda a: a.gpu, "runs a fused CUDA kernel"),
    "bias_dropout_fusion": (lambda a: a.gpu, "runs a fused CUDA kernel"),
    "masked_softmax_fusion": (lambda a: a.gpu, "runs a fused CUDA kernel"),
    "apply_rope_fusion": (lambda a: a.gpu and a.transformer_engine,
                          "takes Transformer Engine's fused rope kernel (needs a GPU and Transformer Engine)"),
    "gradient_accumulation_fusion": (lambda a: a.grad_accum_kernel,
                                     "needs Apex's fused_weight_gradient_mlp_cuda CUDA extension (and a GPU)"),
    "cross_entropy_loss_fusion": (lambda a: a.gpu, "runs a fused CUDA kernel"),
}


def fusion_fields(perf: PerformanceConfig, accelerators: Accelerators) -> dict:
    """Each fusion as set, or (unset) on where the GPU path supports it; validate.py has refused an explicit
    `true` where it is not supported."""
    return {name: (supported(accelerators) if getattr(perf, name) is None else getattr(perf, name))
            for name, (supported, _) in FUSIONS.items()}


def performance_fields(perf: PerformanceConfig, accelerators: Accelerators, is_moe: bool) -> dict:
    """The TransformerConfig fields of the `perf` section."""
    fields = fusion_fields(perf, accelerators)
    if perf.recompute != "none":
        fields["recompute_granularity"] = perf.recompute
        fields["recompute_modules"] = list(perf.recompute_modules)
    if perf.recompute == "full":
        fields["recompute_method"] = perf.recompute_method
        # uniform: units of one layer; block: every layer of the stage (filled in once PP is known)
        fields["recompute_num_layers"] = perf.recompute_num_layers
    grouped = accelerators.te_layers if perf.moe_grouped_gemm is None else perf.moe_grouped_gemm
    fields["moe_grouped_gemm"] = bool(is_moe and grouped)
    fields["overlap_moe_expert_parallel_comm"] = perf.moe_dispatch_overlap
    return fields


def padded_vocab_size(vocab_size: int, tensor_parallel: int) -> int:
    multiple = VOCAB_DIVISIBLE_BY * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def model_fields(hf: dict) -> dict:
    """The TransformerConfig fields the model's HF config decides (its family's mapping)."""
    family = family_of(hf)
    return family.transformer_fields(family.read(hf))


def hf_to_transformer_config(hf: dict, parallel: ParallelConfig, params_dtype: torch.dtype = torch.float32,
                             moe_token_dispatcher: str = "alltoall", init_std: float | None = None,
                             on_gpu: bool = False, perf: PerformanceConfig | None = None,
                             accelerators: Accelerators | None = None,
                             megatron: dict | None = None) -> TransformerConfig:
    """`megatron`: the pass-through's TransformerConfig fields, as megatron-core's own objects (config/
    megatron_fields.py `split_by_owner`), applied last. Without `perf` the fusions follow `on_gpu` alone."""
    family = family_of(hf)
    view = family.read(hf)
    accelerators = accelerators or Accelerators(gpu=on_gpu, transformer_engine=False, te_layers=False,
                                                grad_accum_kernel=False)
    fields = {
        **family.transformer_fields(view),
        "init_method_std": init_std if init_std is not None else view.init_std,
        "tensor_model_parallel_size": parallel.tensor,
        "pipeline_model_parallel_size": parallel.pipeline,
        "virtual_pipeline_model_parallel_size": parallel.virtual_pipeline,
        "context_parallel_size": parallel.context,
        "expert_model_parallel_size": parallel.expert,
        "sequence_parallel": parallel.sequence_parallel,
        "params_dtype": params_dtype,
        "pipeline_dtype": params_dtype,
        "bf16": params_dtype == torch.bfloat16,
        "fp16": params_dtype == torch.float16,
        "use_cpu_initialization": not accelerators.gpu,
        "persist_layer_norm": False,
        "calculate_per_token_loss": True,  # loss = sum over tokens / tokens, exact across micro-batches and DP
        "moe_token_dispatcher_type": moe_token_dispatcher,
        **performance_fields(perf or PerformanceConfig(), accelerators, bool(view.moe)),
        **(megatron or {}),
    }
    if fields.get("recompute_method") and fields.get("recompute_num_layers") is None:
        fields["recompute_num_layers"] = 1 if fields["recompute_method"] == "uniform" else \
            layers_per_stage(view.num_layers, parallel)
    # multi-latent attention has its own config class (its sizes and its rope, yarn included)
    return (MLATransformerConfig if view.mla else TransformerConfig)(**fields)


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


def check_performance_settings(config, hf: dict, accelerators: Accelerators, precision: str) -> dict:
    """Checks the run's `perf` and `megatron` sections (config/validate.py) against the model, the layout and
    this machine, before any process group exists; returns the `megatron` section parsed (JSON form)."""
    from megaswift.config.validate import (validate_fusions, validate_megatron_passthrough,
                                           validate_moe_dispatch_overlap, validate_optimizer_offload,
                                           validate_overlap, validate_recompute)
    view = family_of(hf).read(hf)
    perf, parallel, is_moe = config.perf, config.parallel, bool(view.moe)
    grouped = performance_fields(perf, accelerators, is_moe)["moe_grouped_gemm"]
    validate_recompute(perf, layers_per_stage(view.num_layers, parallel), is_moe, accelerators.transformer_engine,
                       grouped)
    validate_overlap(perf, parallel)
    validate_fusions(perf, {name: (supported(accelerators), reason) for name, (supported, reason) in FUSIONS.items()},
                     accelerators.gpu, accelerators.te_layers, is_moe)
    validate_moe_dispatch_overlap(perf, parallel, precision, config.model.moe_token_dispatcher, accelerators.gpu)
    validate_optimizer_offload(perf, parallel, accelerators.gpu)
    return validate_megatron_passthrough(config.megatron, FLAG_OF_FIELD, set(model_fields(hf)))
