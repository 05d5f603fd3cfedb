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
    layer_spec: str = _help("auto (Transformer Engine where it imports on a GPU), te, or local (megatron-core's "
                            "own modules)", "auto")


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
class PretrainConfig:
    """Everything `megaswift pt` needs; a checkpoint records it whole."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


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
class SFTConfig(PretrainConfig):
    """Everything `megaswift sft` needs: pre-training's settings with chat data in place of indexed data."""
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
