"""Checks that a run's settings fit together, before any process group exists.

Each failure names the setting, the value found and what is allowed, so a bad layout never reaches
megatron-core (whose own asserts are bare, and only fire after processes have started).
"""
from megaswift.config.flags import ConfigError
from megaswift.config.sections import DataConfig, ParallelConfig, TrainConfig

CHOICES = {
    "train.lr_decay_style": ("cosine", "linear", "constant"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.on_nan": ("stop", "skip"),
    "model.moe_token_dispatcher": ("alltoall", "allgather"),
    "model.layer_spec": ("auto", "te", "local"),
}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_choices(values: dict[str, str]) -> None:
    for key, value in values.items():
        _check(value in CHOICES[key], f"{key}={value!r} is not allowed; choose one of {list(CHOICES[key])}")


def how_to_start(processes: int) -> str:
    """How to run a training command in `processes` processes on one node."""
    return (f"`torchrun --nproc-per-node {processes} -m megaswift pt ...` or `megaswift launch --nproc-per-node "
            f"{processes} -- megaswift pt ...` (sft alike; docs/clusters.md for several nodes)")


def data_parallel_size(parallel: ParallelConfig, world_size: int) -> int:
    model_parallel = parallel.tensor * parallel.pipeline * parallel.context
    if world_size % model_parallel:
        multiples = ", ".join(str(model_parallel * k) for k in (1, 2, 3)) + ", ..."
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline x parallel.context "
            f"= {parallel.tensor} x {parallel.pipeline} x {parallel.context} = {model_parallel}: this run has "
            f"{world_size} process{'es' if world_size > 1 else ''} and needs {multiples}; start "
            f"{model_parallel} with {how_to_start(model_parallel)}")
    return world_size // model_parallel


def validate_layout(hf: dict, parallel: ParallelConfig, train: TrainConfig, data: DataConfig, world_size: int,
                    has_transformer_engine: bool = False) -> int:
    """Returns the data-parallel size; raises ConfigError on the first setting that cannot work."""
    for name in ("tensor", "pipeline", "context", "expert"):
        _check(getattr(parallel, name) >= 1, f"parallel.{name} must be >= 1, found {getattr(parallel, name)}")
    dp = data_parallel_size(parallel, world_size)
    from megaswift.models.families import hf_view  # the models package imports megaswift.config
    model = hf_view(hf, where="model config")
    heads, groups = model.num_attention_heads, model.num_kv_heads
    tp = parallel.tensor
    _check(heads % tp == 0, f"parallel.tensor={tp} must divide num_attention_heads={heads}; allowed: "
                            f"{[d for d in range(1, heads + 1) if heads % d == 0 and groups % d == 0]}")
    _check(groups % tp == 0, f"parallel.tensor={tp} must divide num_key_value_heads={groups}; allowed: "
                             f"{[d for d in range(1, groups + 1) if groups % d == 0]}")
    layers = model.num_layers
    stages = parallel.pipeline * (parallel.virtual_pipeline or 1)
    _check(layers % stages == 0, f"num_hidden_layers={layers} is not divisible by parallel.pipeline x "
                                 f"parallel.virtual_pipeline = {stages}")
    if parallel.virtual_pipeline is not None:
        _check(parallel.pipeline >= 2 and parallel.virtual_pipeline >= 1,
               f"parallel.virtual_pipeline={parallel.virtual_pipeline} needs parallel.pipeline >= 2 "
               f"(found {parallel.pipeline})")
    _check(not parallel.sequence_parallel or tp > 1,
           "parallel.sequence_parallel=true needs parallel.tensor > 1 (found 1)")
    if parallel.sequence_parallel:
        _check(data.seq_length % tp == 0, f"data.seq_length={data.seq_length} must be divisible by "
                                          f"parallel.tensor={tp} with sequence parallelism")
    if parallel.context > 1:
        _check(has_transformer_engine, "parallel.context > 1 needs Transformer Engine attention, which is not "
                                       "installed here; use parallel.context=1")
        _check(data.seq_length % (2 * parallel.context) == 0,
               f"data.seq_length={data.seq_length} must be divisible by 2 x parallel.context")
    experts = model.num_experts
    if parallel.expert > 1:
        _check(bool(experts), f"parallel.expert={parallel.expert} needs an MoE model; "
                              f"{model.architecture} has no experts")
    if experts:
        _check(experts % parallel.expert == 0, f"parallel.expert={parallel.expert} must divide the number of "
                                               f"experts {experts}; allowed: "
                                               f"{[d for d in range(1, experts + 1) if experts % d == 0]}")
        _check((dp * tp * parallel.context) % (parallel.expert * tp) == 0,
               f"parallel.expert x parallel.tensor = {parallel.expert * tp} must divide data-parallel x tensor x "
               f"context = {dp * tp * parallel.context} (world size {world_size})")
    per_step = train.micro_batch_size * dp
    _check(train.global_batch_size % per_step == 0,
           f"train.global_batch_size={train.global_batch_size} must be a multiple of train.micro_batch_size x "
           f"data-parallel size = {train.micro_batch_size} x {dp} = {per_step}")
    _check(data.seq_length <= model.max_position_embeddings,
           f"data.seq_length={data.seq_length} exceeds the model's max_position_embeddings="
           f"{model.max_position_embeddings}")
    window = model.sliding_window
    _check(not window or data.seq_length <= window,
           f"data.seq_length={data.seq_length} exceeds the model's sliding_window={window}, which megatron-core's "
           f"local attention does not implement")
    return dp


def packed_attention(packing: bool, transformer_engine: bool, precision: str, parallel: ParallelConfig) -> str | None:
    """How packed rows keep attention inside each sample, or None without packing:
    "mask" for megatron-core's local attention (a block-diagonal causal mask), "thd" for Transformer
    Engine (megatron-core PackedSeqParams, qkv_format="thd"). `precision` is the resolved one:
    bf16, fp16 or fp32."""
    if not packing:
        return None
    if not transformer_engine:
        return "mask"
    # TE runs THD attention only in its flash / cuDNN fused backends (fp16 / bf16); its unfused fp32
    # backend refuses qkv_format="thd", and there is no fp32 path for a mask either.
    _check(precision in ("bf16", "fp16"),
           f"data.packing=true with Transformer Engine attention (THD) needs bf16 or fp16 attention; found "
           f"train.precision resolving to {precision}; set train.precision=bf16, or model.layer_spec=local "
           f"(packing with a block-diagonal mask, any precision), or data.packing=false")
    # Context parallelism over THD needs each sample split across CP ranks (TE's partitioned indices and
    # cu_seqlens_*_padded, every sample padded to a multiple of 2 x CP); that is not wired up.
    _check(parallel.context == 1,
           f"data.packing=true with parallel.context={parallel.context} is not supported (THD packed "
           f"sequences are not split across context-parallel ranks); set parallel.context=1, or "
           f"data.packing=false")
    return "thd"
