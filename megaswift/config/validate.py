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
    "model.layer_spec": ("auto", "te", "torch", "local"),
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


def pipeline_stages(parallel: ParallelConfig) -> int:
    """Model chunks along the pipeline: each pipeline stage holds `virtual_pipeline` of them (one without VPP)."""
    return parallel.pipeline * (parallel.virtual_pipeline or 1)


def layers_per_stage(num_layers: int, parallel: ParallelConfig) -> int:
    """Decoder layers in each model chunk (validate_layout has checked that they divide evenly)."""
    return num_layers // pipeline_stages(parallel)


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
    sizes = model.tensor_parallel_sizes()  # heads, and what else the family splits (MLA's latent ranks)
    for name, size in sizes.items():
        _check(size % tp == 0, f"parallel.tensor={tp} must divide {name}={size}; allowed: "
                               f"{[d for d in range(1, heads + 1) if all(v % d == 0 for v in sizes.values())]}")
    layers = model.num_layers
    stages = pipeline_stages(parallel)
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


def packed_attention(packing: bool, layer_spec: str, precision: str, parallel: ParallelConfig, *,
                     on_gpu: bool) -> str | None:
    """How packed rows keep attention inside each sample, or None without packing:
    "thd" (megatron-core PackedSeqParams, qkv_format="thd") for Transformer Engine, and for the torch spec
    on a GPU; else "mask" (a block-diagonal causal mask per row). `layer_spec` is the resolved one
    (models/builder.py `resolve_layer_spec`: te, torch or local); `precision` too: bf16, fp16 or fp32."""
    if not packing:
        return None
    if layer_spec == "torch":
        # On a GPU the torch spec runs THD as compiled FlexAttention with document ids from cu_seqlens, in any
        # precision, and no [seq, seq] mask per row is built and copied. On CPU FlexAttention has no backward,
        # so the torch spec trains with SDPA and the mask. It has no context parallelism (validate_layout).
        return "thd" if on_gpu and parallel.context == 1 else "mask"
    if layer_spec != "te":
        return "mask"
    # TE runs THD attention only in its flash / cuDNN fused backends (fp16 / bf16); its unfused fp32
    # backend refuses qkv_format="thd", and there is no fp32 path for a mask either.
    _check(precision in ("bf16", "fp16"),
           f"data.packing=true with Transformer Engine attention (THD) needs bf16 or fp16 attention; found "
           f"train.precision resolving to {precision}; set train.precision=bf16, or model.layer_spec=local or torch "
           f"(any precision: local packs with a block-diagonal mask, torch on a GPU with THD), or "
           f"data.packing=false")
    # Context parallelism over THD needs each sample split across CP ranks (TE's partitioned indices and
    # cu_seqlens_*_padded, every sample padded to a multiple of 2 x CP); that is not wired up.
    _check(parallel.context == 1,
           f"data.packing=true with parallel.context={parallel.context} is not supported (THD packed "
           f"sequences are not split across context-parallel ranks); set parallel.context=1, or "
           f"data.packing=false")
    return "thd"


# ------------------------------------------------------------------ performance settings (the perf section)

RECOMPUTE = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
SELECTIVE_MODULES = ("core_attn", "mlp", "layernorm", "moe", "moe_act", "shared_experts")
MOE_MODULES = ("moe", "moe_act", "shared_experts")
# megatron-core 0.19 recomputes these with CheckpointWithoutOutput, which takes Transformer Engine's FP8 path
# whatever its fp8 argument (`self.fp8 = fp8 is not None`), so without TE they fail with a NameError.
TE_MODULES = ("layernorm", "moe_act")


def validate_recompute(perf, stage_layers: int, is_moe: bool, transformer_engine: bool = False,
                       grouped_gemm: bool = False) -> None:
    """`stage_layers`: transformer layers per pipeline stage (per virtual stage with VPP);
    `transformer_engine`: TE imports here; `grouped_gemm`: the run's MoE experts are grouped."""
    _check(perf.recompute in RECOMPUTE, f"perf.recompute={perf.recompute!r} is not allowed; choose one of "
                                        f"{list(RECOMPUTE)}")
    _check(perf.recompute_method in RECOMPUTE_METHODS, f"perf.recompute_method={perf.recompute_method!r} is not "
                                                       f"allowed; choose one of {list(RECOMPUTE_METHODS)}")
    layers = perf.recompute_num_layers
    if perf.recompute != "full":
        _check(layers is None, f"perf.recompute_num_layers={layers} applies only to perf.recompute=full (found "
                               f"{perf.recompute!r}); unset it, or set perf.recompute=full")
    else:
        _check(layers is None or 1 <= layers <= stage_layers,
               f"perf.recompute_num_layers={layers} must be between 1 and the layers of one pipeline stage "
               f"({stage_layers})")
    if perf.recompute == "selective":
        unknown = [m for m in perf.recompute_modules if m not in SELECTIVE_MODULES]
        _check(not unknown, f"perf.recompute_modules: {unknown} not allowed; choose from {list(SELECTIVE_MODULES)}")
        _check(bool(perf.recompute_modules), "perf.recompute=selective needs at least one perf.recompute_modules "
                                             f"entry; choose from {list(SELECTIVE_MODULES)}")
        moe_only = [m for m in perf.recompute_modules if m in MOE_MODULES]
        _check(is_moe or not moe_only, f"perf.recompute_modules: {moe_only} exist only in MoE models; this model is "
                                       f"dense: use core_attn, mlp and/or layernorm")
        needs_te = [m for m in perf.recompute_modules if m in TE_MODULES]
        _check(transformer_engine or not needs_te,
               f"perf.recompute_modules: {needs_te} need Transformer Engine, which is not installed here "
               f"(megatron-core recomputes them with TE's checkpoint); use core_attn and/or mlp, or "
               f"perf.recompute=full")
        _check("moe_act" not in perf.recompute_modules or grouped_gemm,
               "perf.recompute_modules: moe_act needs grouped MoE experts (perf.moe_grouped_gemm with TE layers)")


def validate_overlap(perf, parallel: ParallelConfig) -> None:
    """Both overlaps run on gloo too (tests/train/test_perf_settings.py: the same losses as without)."""
    _check(not perf.overlap_param_gather or parallel.distributed_optimizer,
           "perf.overlap_param_gather=true needs parallel.distributed_optimizer=true (only the distributed "
           "optimizer gathers parameters after its step)")
    _check(not perf.overlap_param_gather or perf.overlap_grad_reduce,
           "perf.overlap_param_gather=true needs perf.overlap_grad_reduce=true as well")
    _check(perf.bucket_size is None or perf.bucket_size > 0,
           f"perf.bucket_size must be a positive number of elements, found {perf.bucket_size}")
    _check(perf.bucket_size is None or perf.overlap_grad_reduce,
           f"perf.bucket_size={perf.bucket_size} applies only with perf.overlap_grad_reduce=true (without overlap "
           f"all gradients are reduced as one buffer)")


def validate_fusions(perf, fusions: dict, gpu: bool, te_layers: bool, is_moe: bool) -> None:
    """`fusions`: name -> (supported here, why not) from models/mcore_config.py; an explicit `true` that this
    machine cannot run is refused (the default, unset, turns each on only where it runs)."""
    for name, (supported, reason) in fusions.items():
        _check(getattr(perf, name) is not True or supported,
               f"perf.{name}=true cannot run here: it {reason}"
               f"{'' if gpu else ', and this machine has no GPU'}; leave it unset (on wherever the GPU path "
               f"supports it) or set it to false")
    _check(perf.moe_grouped_gemm is not True or te_layers,
           "perf.moe_grouped_gemm=true needs Transformer Engine layers (model.layer_spec te, or auto with Transformer "
           "Engine on a GPU): megatron-core's grouped experts are TE's GroupedLinear; leave it unset or set false")
    _check(perf.moe_grouped_gemm is not True or is_moe, "perf.moe_grouped_gemm=true needs an MoE model; this one is "
                                                         "dense")


def validate_moe_dispatch_overlap(perf, parallel: ParallelConfig, precision: str, dispatcher: str, gpu: bool) -> None:
    if not perf.moe_dispatch_overlap:
        return
    _check(gpu, "perf.moe_dispatch_overlap=true needs a GPU (it overlaps CUDA streams); on the CPU leave it off")
    _check(parallel.expert > 1, f"perf.moe_dispatch_overlap=true needs parallel.expert > 1 (found {parallel.expert})")
    _check(dispatcher == "alltoall", f"perf.moe_dispatch_overlap=true needs model.moe_token_dispatcher=alltoall "
                                     f"(found {dispatcher})")
    _check(precision in ("bf16", "fp16"), f"perf.moe_dispatch_overlap=true needs bf16 or fp16 (train.precision "
                                          f"resolves to {precision})")
    _check(perf.recompute != "full", "perf.moe_dispatch_overlap=true does not work with perf.recompute=full")
    _check(parallel.pipeline == 1 or parallel.virtual_pipeline is not None,
           "perf.moe_dispatch_overlap=true with parallel.pipeline > 1 needs parallel.virtual_pipeline")
    # megatron-core runs it in its combined 1F1B schedule, whose forward step returns a schedule plan
    # (GPTModel.build_schedule_plan) instead of the output; megaswift's forward step returns the output.
    raise ConfigError("perf.moe_dispatch_overlap=true is not supported yet: megatron-core's combined 1F1B schedule "
                      "needs a forward step that builds a schedule plan, which megaswift's does not; leave it off")


def validate_optimizer_offload(perf, parallel: ParallelConfig, gpu: bool) -> None:
    _check(0.0 <= perf.optimizer_offload_fraction <= 1.0,
           f"perf.optimizer_offload_fraction must be in [0, 1], found {perf.optimizer_offload_fraction}")
    if perf.optimizer_cpu_offload:
        _check(gpu, "perf.optimizer_cpu_offload=true needs a GPU: without one the optimizer state is in CPU memory "
                    "already; leave it off")
        _check(parallel.distributed_optimizer, "perf.optimizer_cpu_offload=true needs "
                                               "parallel.distributed_optimizer=true (megatron-core offloads the "
                                               "distributed optimizer's shards)")


def validate_megatron_passthrough(values: dict, set_by_megaswift: dict[str, str], model_fields: set[str],
                                  where: str = "megatron") -> dict:
    """The `megatron` section's values, each parsed by its megatron-core field's type (JSON form, as the run's
    config records them). Unknown names list the closest field names; a field megaswift sets names what sets it."""
    from megaswift.config.megatron_fields import megatron_fields, parse_megatron_value, unknown_field_message
    _check(isinstance(values, dict), f"{where}: expected a mapping of megatron-core field names to values, found "
                                     f"{values!r}")
    parsed = {}
    for name, value in values.items():
        _check(name in megatron_fields(), unknown_field_message(name, where))
        if name in set_by_megaswift:
            how = set_by_megaswift[name]
            raise ConfigError(f"{where}: megatron.{name} is set by "
                              f"{f'the flag {how} (or its YAML key); use it instead' if how.startswith('--') else how}")
        _check(name not in model_fields, f"{where}: megatron.{name} comes from the model's HF config; change it "
                                         f"with --model.overrides '{{\"HF_KEY\": VALUE}}' (HF key names)")
        parsed[name] = parse_megatron_value(name, value, where)
    return parsed
