"""megatron-core DDP wrapping, optimizer and learning-rate schedule for a run's settings."""
import contextlib
import math

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import ChainedOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig

from megaswift.config import ParallelConfig, TrainConfig
from megaswift.config.sections import PerformanceConfig


def ddp_config_for(parallel: ParallelConfig, perf: PerformanceConfig | None = None,
                   megatron: dict | None = None) -> DistributedDataParallelConfig:
    """megatron-core's DDP settings for a run: its overlap and bucket settings (`perf`), then the `megatron`
    pass-through's DistributedDataParallelConfig fields (megatron-core objects: config/megatron_fields.py)."""
    perf = perf or PerformanceConfig()
    return DistributedDataParallelConfig(**{
        "grad_reduce_in_fp32": True, "use_distributed_optimizer": parallel.distributed_optimizer,
        "overlap_grad_reduce": perf.overlap_grad_reduce, "overlap_param_gather": perf.overlap_param_gather,
        "bucket_size": perf.bucket_size, "check_for_nan_in_grad": False,  # train/nonfinite.py handles NaN
        "average_in_collective": False,  # per-token loss: gradients are summed, the schedule divides by tokens
        **(megatron or {})})


def wrap_with_ddp(chunks: list, config: TransformerConfig, parallel: ParallelConfig,
                  ddp_config: DistributedDataParallelConfig | None = None) -> list:
    ddp_config = ddp_config or ddp_config_for(parallel)
    # Only the first chunk buckets its gradients; later virtual-pipeline chunks reduce as one buffer.
    return [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=index > 0)
            for index, chunk in enumerate(chunks)]


@contextlib.contextmanager
def parameters_gathered(model: list):
    """With perf.overlap_param_gather the distributed optimizer's step updates only each rank's own shard;
    the other ranks' shards arrive in the next forward pass (DDP's forward pre-hooks). Code that reads the
    parameters outside a forward pass (a checkpoint save) runs inside this: it gathers them now, and puts
    the hooks back afterwards."""
    overlapped = [chunk for chunk in model if chunk.ddp_config.overlap_param_gather]
    for chunk in overlapped:
        chunk.disable_forward_pre_hook()  # synchronous all-gather of every bucket
    try:
        yield
    finally:
        for chunk in overlapped:
            chunk.enable_forward_pre_hook()


def optimizer_config_for(train: TrainConfig, parallel: ParallelConfig, params_dtype: torch.dtype,
                         perf: PerformanceConfig | None = None) -> OptimizerConfig:
    perf = perf or PerformanceConfig()
    offload = {}
    if perf.optimizer_cpu_offload:  # megatron-core's HybridDeviceOptimizer runs only as a precision-aware optimizer
        offload = {"optimizer_cpu_offload": True, "optimizer_offload_fraction": perf.optimizer_offload_fraction,
                   "use_precision_aware_optimizer": True}
    return OptimizerConfig(
        optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=train.adam_eps,
        clip_grad=train.clip_grad, bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        params_dtype=params_dtype, use_distributed_optimizer=parallel.distributed_optimizer,
        overlap_param_gather=perf.overlap_param_gather, **offload)


def build_optimizer(model: list, train: TrainConfig, parallel: ParallelConfig, params_dtype: torch.dtype,
                    perf: PerformanceConfig | None = None):
    optimizer = get_megatron_optimizer(optimizer_config_for(train, parallel, params_dtype, perf), model)
    return FiniteUpdatesOptimizer(getattr(optimizer, "chained_optimizers", [optimizer]))


class FiniteUpdatesOptimizer(ChainedOptimizer):
    """megatron-core's ChainedOptimizer, refusing an update whose gradient norm is NaN or infinite.

    megatron-core finds non-finite gradients only through an fp16 loss scaler (`prepare_grads` returns
    found_inf and `step()` returns (False, None, None)). With fp32 or bf16 there is no scaler: `step()`
    applies a NaN gradient and reports the NaN norm afterwards. Its own `grad_norm_skip_threshold` refuses
    only norms above a finite threshold, which a NaN never is. But `step()` computes the global norm
    (all-reduced over the gradient-statistics group, so every rank holds the same value) before clipping
    and before `step_with_ready_grads()` touches a parameter: refusing there makes `step()` return
    (False, norm, zeros), as it does for a norm above the threshold, on every rank alike.
    """

    def step(self):
        self.last_grad_norm = None  # stays None when the fp16 scaler's found_inf ends the step early
        return super().step()

    def get_grad_norm(self):
        self.last_grad_norm = super().get_grad_norm()
        return self.last_grad_norm

    def step_with_ready_grads(self) -> bool:
        # float(): with Transformer Engine's kernels megatron-core returns the norm as a one-element tensor
        if self.last_grad_norm is not None and not math.isfinite(float(self.last_grad_norm)):
            return False
        return super().step_with_ready_grads()


def build_scheduler(optimizer, train: TrainConfig) -> OptimizerParamScheduler:
    decay_iters = train.lr_decay_iters or train.train_iters
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if train.lr_warmup_iters else train.lr, max_lr=train.lr, min_lr=train.min_lr,
        lr_warmup_steps=train.lr_warmup_iters, lr_decay_steps=max(decay_iters, train.lr_warmup_iters + 1),
        lr_decay_style=train.lr_decay_style, start_wd=train.weight_decay, end_wd=train.weight_decay,
        wd_incr_steps=max(train.train_iters, 1), wd_incr_style="constant",
        # On resume the run's settings win over the checkpoint's (flags > checkpoint): lr, warmup, decay.
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
