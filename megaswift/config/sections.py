"""The settings of a run, one dataclass per concern. Flags, YAML files and checkpoints all use these."""
from dataclasses import dataclass, field


def _help(text: str, default=None, factory=None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig:
    """The model: a named preset or an HF config.json, optionally with fields overridden."""
    preset: str | None = _help("named preset (see megaswift/models/families/)", "tiny-llama")
    hf_config: str | None = _help("path to an HF config.json or a folder holding one; wins over preset")
    overrides: dict = _help("HF config fields to override, as JSON", factory=dict)
    moe_token_dispatcher: str = _help("MoE token dispatcher: alltoall or allgather", "alltoall")
    init_std: float = _help("std of the random initialisation", 0.02)
    layer_spec: str = _help("te (Transformer Engine), torch (megatron-core's modules with torch's SDPA / "
                            "FlexAttention kernels as core attention; no context parallelism), local "
                            "(megatron-core's own modules), or auto: te where it imports on a GPU, else torch "
                            "on a GPU, else local", "auto")


@dataclass
class ParallelConfig:
    """How the model and data are split over processes (data parallel size is what remains)."""
    tensor: int = _help("tensor-parallel size", 1)
    pipeline: int = _help("pipeline-parallel size", 1)
    virtual_pipeline: int | None = _help("virtual pipeline stages per rank (interleaved 1F1B)")
    context: int = _help("context-parallel size", 1)
    expert: int = _help("expert-parallel size (MoE)", 1)
    sequence_parallel: bool = _help("sequence parallelism (needs tensor > 1)", False)
    distributed_optimizer: bool = _help("shard optimizer state over data-parallel ranks", False)


@dataclass
class DataConfig:
    """Training data: Megatron indexed datasets with blend weights."""
    paths: list[str] = _help("indexed dataset prefixes, optionally with weights: 0.7 a 0.3 b", factory=list)
    split: str = _help("train,valid,test split of each dataset, e.g. 98,1,1", "98,1,1")
    seq_length: int = _help("tokens per sample", 128)
    tokenizer: str | None = _help("HF tokenizer folder (for the eod id and vocab size check)")
    cache_dir: str | None = _help("where megatron-core caches dataset indices (default: beside the data)")
    num_workers: int = _help("data loader worker processes", 0)


@dataclass
class TrainConfig:
    """Optimisation: batch sizes, steps, learning rate schedule, precision and loss."""
    micro_batch_size: int = _help("samples per micro-batch per data-parallel rank", 2)
    global_batch_size: int = _help("samples per step across all data-parallel ranks", 8)
    train_iters: int = _help("optimizer steps to train for", 100)
    lr: float = _help("peak learning rate", 3e-4)
    min_lr: float = _help("learning rate at the end of decay", 3e-5)
    lr_warmup_iters: int = _help("linear warmup steps", 10)
    lr_decay_style: str = _help("cosine, linear or constant", "cosine")
    lr_decay_iters: int | None = _help("decay steps (default: train_iters)")
    weight_decay: float = _help("AdamW weight decay", 0.01)
    adam_beta1: float = _help("AdamW beta1", 0.9)
    adam_beta2: float = _help("AdamW beta2", 0.95)
    adam_eps: float = _help("AdamW epsilon", 1e-8)
    clip_grad: float = _help("clip the global gradient norm to this (0: off)", 1.0)
    precision: str = _help("bf16, fp16 or fp32 (auto: bf16 on a GPU that supports it, fp32 on CPU)", "auto")
    seed: int = _help("random seed", 1234)
    on_nan: str = _help("a step whose loss or gradient norm is NaN/Inf is never applied; then stop (naming the step) "
                        "or skip (its batch is consumed, the weights, optimizer and lr schedule stay as they were; "
                        "counted as skipped_steps in the log)", "stop")
    max_consecutive_skips: int = _help("with on_nan=skip: at most this many skipped steps in a row; one more stops "
                                       "the run (0: no limit)", 5)
    max_skipped_steps: int = _help("with on_nan=skip: at most this many skipped steps in this run; one more stops "
                                   "the run (0: no limit)", 0)
    fused_loss: bool = _help("use megaswift.kernels' loss-scaled cross entropy", False)
    eval_interval: int = _help("evaluate every N steps (0: never)", 0)
    eval_iters: int = _help("micro-batches per evaluation and data-parallel rank", 2)
    exit_after_iters: int | None = _help("stop (saving a checkpoint) after this many steps of this run")


@dataclass
class CheckpointConfig:
    """dist_checkpointing (torch_dist) checkpoints: where to save, how often, where to resume from."""
    save: str | None = _help("folder for checkpoints (iter_NNNNNNN/ and a `latest` file)")
    save_interval: int = _help("save every N steps (0: only at the end)", 0)
    load: str | None = _help("checkpoint folder to resume or start from (default: save, if it has one)")
    finetune: bool = _help("load weights only: reset step, optimizer and schedule", False)
    save_initial: bool = _help("also save the weights before the first step (iter_0000000)", False)
    verify: bool = _help("check the loaded checkpoint's files against the sizes and CRC32s recorded at save time",
                         True)
    fallback: bool = _help("when the checkpoint to load is damaged, load the newest earlier intact one instead of "
                           "stopping", False)
    keep_last: int = _help("keep only the newest N complete checkpoints in checkpoint.save, deleting older ones "
                           "after each save (0: keep all)", 0)
    keep_every: int = _help("with keep_last: also keep, forever, every checkpoint whose step is a multiple of M "
                            "(0: none)", 0)


@dataclass
class LoggingConfig:
    """Where and how often to report progress."""
    output_dir: str | None = _help("folder for metrics.jsonl, TensorBoard events and config.yaml (the resolved "
                                   "config of the run); default: <checkpoint.save>/logs, or a new "
                                   "runs/<date-time> folder when nothing is saved")
    log_interval: int = _help("log every N steps", 1)
    tensorboard: bool = _help("write TensorBoard event files", True)
    progress_bar: bool = _help("show a progress bar on rank 0", True)


@dataclass
class TunerConfig:
    """Which weights are trained: all of them, or low-rank adapters (LoRA/DoRA) on a frozen base."""
    type: str = _help("full (train every weight), lora or dora (train adapters on a frozen base)", "full")
    rank: int = _help("adapter rank r", 8)
    alpha: float = _help("adapter scaling numerator: updates are scaled by alpha/r (alpha/sqrt(r) with rslora)",
                         32.0)
    dropout: float = _help("dropout on the adapter's input", 0.0)
    rslora: bool = _help("scale by alpha/sqrt(r) instead of alpha/r (rank-stabilised LoRA)", False)
    targets: str = _help("all-linear, or comma-separated HF module names such as q_proj,v_proj,gate_proj",
                         "all-linear")
    modules_to_save: list[str] = _help("HF modules trained in full beside the adapters: embed_tokens and/or lm_head",
                                       factory=list)


@dataclass
class PerformanceConfig:
    """Speed and memory: activation recompute, communication overlap, fused kernels, optimizer offload."""
    recompute: str = _help("activation recompute: none, selective (the modules in perf.recompute_modules) or full "
                           "(whole layers, see recompute_method)", "none")
    recompute_method: str = _help("with recompute=full: uniform (recompute every layer, in units of "
                                  "recompute_num_layers) or block (only the first recompute_num_layers layers of "
                                  "each pipeline stage)", "uniform")
    recompute_num_layers: int | None = _help("with recompute=full: layers per unit (uniform) or layers recomputed "
                                             "per pipeline stage (block); default: 1 (uniform), all of a stage's "
                                             "layers (block)")
    recompute_modules: list[str] = _help("with recompute=selective: core_attn, mlp, layernorm, moe, moe_act, "
                                         "shared_experts", factory=lambda: ["core_attn"])
    overlap_grad_reduce: bool = _help("overlap the data-parallel gradient all-reduce / reduce-scatter with the "
                                      "backward pass", False)
    overlap_param_gather: bool = _help("overlap the distributed optimizer's parameter all-gather with the next "
                                       "forward pass (needs parallel.distributed_optimizer and "
                                       "perf.overlap_grad_reduce)", False)
    bucket_size: int | None = _help("gradients per data-parallel communication bucket, in elements, with "
                                    "overlap_grad_reduce; default: megatron-core's max(40M, 1M x DP)")
    bias_activation_fusion: bool | None = _help("fused bias + SwiGLU/GeLU; default: on with a GPU")
    bias_dropout_fusion: bool | None = _help("fused bias + dropout + residual add; default: on with a GPU")
    masked_softmax_fusion: bool | None = _help("fused scale + mask + softmax in local attention; default: on with "
                                               "a GPU")
    apply_rope_fusion: bool | None = _help("Transformer Engine's fused rotary embedding; default: on with a GPU "
                                           "where Transformer Engine imports")
    gradient_accumulation_fusion: bool | None = _help("weight-gradient GEMM accumulating straight into the fp32 main "
                                                      "gradient (Apex's fused_weight_gradient_mlp_cuda); default: "
                                                      "on with a GPU where it imports")
    cross_entropy_loss_fusion: bool | None = _help("megatron-core's fused vocab-parallel cross entropy; default: "
                                                   "on with a GPU")
    moe_grouped_gemm: bool | None = _help("MoE experts as one grouped GEMM (Transformer Engine's GroupedLinear); "
                                          "default: on with the te layer spec")
    moe_dispatch_overlap: bool = _help("overlap MoE token dispatch/combine all-to-all with computation "
                                       "(megatron-core's overlap_moe_expert_parallel_comm; needs a GPU, EP > 1, "
                                       "bf16; refused for now: megaswift's forward step does not yet build the "
                                       "schedule plan its combined 1F1B schedule runs)", False)
    optimizer_cpu_offload: bool = _help("keep optimizer state (and its update) in CPU memory (megatron-core's "
                                        "HybridDeviceOptimizer; needs a GPU and parallel.distributed_optimizer)",
                                        False)
    optimizer_offload_fraction: float = _help("with optimizer_cpu_offload: fraction of the optimizer state "
                                              "offloaded", 1.0)


@dataclass
class EvalConfig:
    """Benchmarks run on the checkpoints saved during training (`megaswift eval` in a background process on
    rank 0), their scores written to metrics.jsonl as eval/<task>/<metric> at the checkpoint's step."""
    tasks: list[str] = _help("what `megaswift eval --tasks` takes: *.csv (multiple choice), *.jsonl (QA), "
                             "lm-eval task YAMLs or names; empty: no evaluations", factory=list)
    interval: int = _help("evaluate the checkpoint saved every N steps, a multiple of checkpoint.save_interval "
                          "(0: only the run's last checkpoint); the run's last checkpoint is always evaluated", 0)
    max_new_tokens: int = _help("QA answer length", 128)
    limit: int | None = _help("first N items of each task (default: all)")
    batch_size: int = _help("prompts per generation batch", 8)
    device: str = _help("torch device of the evaluation process: cpu (never takes accelerator memory from "
                        "training) or cuda / cuda:N where training leaves room", "cpu")
    wait_s: float = _help("at the end of the run, wait at most this long for evaluations still running, then "
                          "stop them (a run stopped by SIGTERM never waits)", 1800.0)
    lm_eval_include: list[str] = _help("folders of lm-eval task YAMLs whose task names eval.tasks may use",
                                       factory=list)
    num_fewshot: int | None = _help("lm-eval: examples in each prompt")
    apply_chat_template: bool = _help("lm-eval: render its prompts with the model's chat template", False)


@dataclass
class PretrainConfig:
    """Everything `megaswift pt` needs; a checkpoint records it whole."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tuner: TunerConfig = field(default_factory=TunerConfig)
    perf: PerformanceConfig = field(default_factory=PerformanceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    megatron: dict = field(default_factory=dict, metadata={
        "help": "any other megatron-core TransformerConfig / DistributedDataParallelConfig field, as "
                "--megatron.FIELD VALUE or a `megatron:` mapping in YAML", "megatron_passthrough": True})


@dataclass
class SFTDataConfig:
    """Chat / agent data for fine-tuning: sources, template masks, loss scale and packing."""
    datasets: list[str] = _help("jsonl/json/csv/parquet files, `datasets` folders or hub names; `path#N` samples N "
                                "rows", factory=list)
    tokenizer: str | None = _help("HF tokenizer folder with a chat template (default: the checkpoint's hf_assets)")
    seq_length: int = _help("tokens per training row (samples are truncated or dropped to fit)", 512)
    loss_on: str = _help("which tokens are trained: last_round, all_assistant or all", "all_assistant")
    loss_scale: str = _help("per-token loss weights: default, agent, or a JSON config file", "default")
    over_length: str = _help("samples longer than seq_length: drop or truncate", "drop")
    packing: bool = _help("pack several samples per row (first-fit-decreasing, attention never crosses samples)",
                          False)
    skip_bad_rows: bool = _help("skip malformed rows (counted in the log) instead of stopping", False)
    num_proc: int = _help("preprocessing worker processes", 1)
    cache_dir: str | None = _help("preprocessing cache (default: ~/.cache/megaswift/sft)")
    valid_fraction: float = _help("fraction of samples held out for evaluation", 0.0)


@dataclass
class RLHFConfig:
    """Preference training: the objective, its loss type and where the reference log-probs come from."""
    type: str = _help("dpo (with a reference model), simpo or orpo (reference-free)", "dpo")
    loss: str = _help("with type dpo: sigmoid, cdpo, robust, hinge or ipo (length-normalised)", "sigmoid")
    beta: float = _help("DPO's / SimPO's beta, ORPO's lambda", 0.1)
    label_smoothing: float = _help("label smoothing eps of sigmoid / cdpo / robust / simpo, in [0, 0.5)", 0.0)
    rpo_alpha: float = _help("weight of the token-mean NLL of the chosen answers added to the loss (RPO; 0: off)",
                             0.0)
    simpo_gamma: float = _help("SimPO's target reward margin", 0.5)
    reference: str = _help("where DPO's reference log-probs come from: model (a frozen copy of the starting "
                           "checkpoint), precomputed (one forward pass over the data before training, stored in the "
                           "run's folder; no second model), or adapters (LoRA runs: the adapter-disabled model)",
                           "model")


@dataclass
class SFTConfig(PretrainConfig):
    """Everything `megaswift sft` needs: pre-training's settings with chat data in place of indexed data."""
    data: SFTDataConfig = field(default_factory=SFTDataConfig)


@dataclass
class RLHFRunConfig(SFTConfig):
    """Everything `megaswift rlhf` needs: sft's settings (preference rows as data) plus the rlhf section."""
    rlhf: RLHFConfig = field(default_factory=RLHFConfig)
