"""The training loop: megatron-core model chunks, DDP, optimizer and forward-backward schedules.

`train(config, data_source)` serves `megaswift pt` and `megaswift sft` alike; they differ only in the
data source, which turns (consumed samples, data-parallel rank) into micro-batch iterators.
"""
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import megatron.core
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megaswift.checkpointing.layout import HF_ASSETS, read_latest, read_meta, resolve_checkpoint
from megaswift.checkpointing.state import load_checkpoint, save_checkpoint
from megaswift.config import ConfigError, config_to_dict
from megaswift.config.validate import validate_choices, validate_layout
from megaswift.models import hf_to_transformer_config, resolve_hf_config
from megaswift.models.builder import build_model_chunks, transformer_engine_available
from megaswift.train.distributed import init_distributed, shutdown_distributed, world_from_env
from megaswift.train.forward_step import make_forward_step
from megaswift.train.metrics import MetricsLogger, device_peak_flops, flops_per_token
from megaswift.train.optimizer import build_optimizer, build_scheduler, wrap_with_ddp
from megaswift.train.preemption import StopRequest


class TrainingError(RuntimeError):
    pass


class DataSource(Protocol):
    def train_iterators(self, consumed_samples: int, dp_rank: int, dp_size: int, count: int) -> list: ...

    def valid_iterators(self, dp_rank: int, dp_size: int, count: int) -> list | None: ...


@dataclass
class TrainResult:
    last_step: int
    losses: dict[int, float] = field(default_factory=dict)
    stopped_by_signal: bool = False


def resolve_precision(precision: str) -> torch.dtype:
    if precision == "auto":
        use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def checkpoint_to_load(config) -> tuple[Path | None, bool]:
    """(folder, weights_only). An explicit checkpoint.load wins; else resume from checkpoint.save's latest."""
    ck = config.checkpoint
    if ck.load:
        return resolve_checkpoint(ck.load), ck.finetune
    if ck.save and Path(ck.save).is_dir() and read_latest(ck.save) is not None:
        return resolve_checkpoint(ck.save), False
    return None, False


def _reduce_loss(losses_reduced: list) -> torch.Tensor:
    """[loss sum, token count] of the step, identical on every rank (zeros off the last pipeline stage)."""
    total = torch.zeros(2, dtype=torch.float64)
    for record in losses_reduced:
        total += record["loss"].detach().to("cpu", torch.float64)
    if torch.cuda.is_available():
        total = total.cuda()
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return total.cpu()


def _model_config(hf: dict, config):
    on_gpu = torch.cuda.is_available()
    tconfig = hf_to_transformer_config(hf, config.parallel, resolve_precision(config.train.precision),
                                       config.model.moe_token_dispatcher, config.model.init_std, on_gpu=on_gpu)
    # Batched p2p on gloo gives silently wrong interleaved-pipeline results at PP=2 (mcore-on-cpu.md).
    tconfig.batch_p2p_comm = on_gpu
    tconfig.overlap_p2p_comm = False
    return tconfig


class Trainer:
    def __init__(self, config, data_source: DataSource):
        self.config, self.data_source = config, data_source
        validate_choices({"train.lr_decay_style": config.train.lr_decay_style,
                          "train.precision": config.train.precision, "train.on_nan": config.train.on_nan,
                          "model.moe_token_dispatcher": config.model.moe_token_dispatcher})
        self.load_dir, self.weights_only = checkpoint_to_load(config)
        self.hf = read_meta(self.load_dir)["hf_config"] if self.load_dir else resolve_hf_config(config.model)
        world = world_from_env()
        self.dp_size = validate_layout(self.hf, config.parallel, config.train, config.data, world.world_size,
                                       transformer_engine_available())

    def run(self) -> TrainResult:
        cfg = self.config
        world = init_distributed(cfg.parallel, cfg.train.seed)
        try:
            return self._run(world)
        finally:
            shutdown_distributed()

    def _build(self):
        cfg = self.config
        tconfig = _model_config(self.hf, cfg)
        model = wrap_with_ddp(build_model_chunks(self.hf, tconfig), tconfig, cfg.parallel)
        optimizer = build_optimizer(model, cfg.train, cfg.parallel, tconfig.params_dtype)
        scheduler = build_scheduler(optimizer, cfg.train)
        tconfig.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
        tconfig.finalize_model_grads_func = finalize_model_grads
        tconfig.grad_scale_func = optimizer.scale_loss
        return tconfig, model, optimizer, scheduler

    def _run(self, world) -> TrainResult:
        cfg = self.config
        tconfig, model, optimizer, scheduler = self._build()
        start = 0
        if self.load_dir is not None:
            if self.weights_only:
                load_checkpoint(self.load_dir, model)
            else:
                start = load_checkpoint(self.load_dir, model, optimizer, scheduler)
        dp_rank = parallel_state.get_data_parallel_rank()
        num_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * self.dp_size)
        iterators = self.data_source.train_iterators(start * cfg.train.global_batch_size, dp_rank, self.dp_size,
                                                     len(model))
        forward_backward = get_forward_backward_func()
        forward_step = make_forward_step(cfg.train.fused_loss)
        logger = MetricsLogger(cfg.logging.output_dir, world.rank == 0, cfg.train.train_iters, start,
                               cfg.logging.tensorboard, cfg.logging.progress_bar)
        result = TrainResult(last_step=start)
        tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length
        flops_per_step = flops_per_token(self.hf, cfg.data.seq_length) * tokens_per_step
        peak = device_peak_flops()
        end = cfg.train.train_iters
        if cfg.train.exit_after_iters is not None:
            end = min(end, start + cfg.train.exit_after_iters)
        skipped = 0
        step = start
        if cfg.checkpoint.save and cfg.checkpoint.save_initial and start == 0:
            self.save(0, model, optimizer, scheduler)
        try:
            with StopRequest() as stop:
                while step < end:
                    began = time.perf_counter()
                    for chunk in model:
                        chunk.zero_grad_buffer()
                    optimizer.zero_grad()
                    losses = forward_backward(forward_step_func=forward_step, data_iterator=iterators, model=model,
                                              num_microbatches=num_micro, seq_length=cfg.data.seq_length,
                                              micro_batch_size=cfg.train.micro_batch_size, forward_only=False)
                    loss_sum, count = _reduce_loss(losses).tolist()
                    loss = loss_sum / max(count, 1.0)
                    step += 1
                    if not math.isfinite(loss):
                        if cfg.train.on_nan == "stop":
                            raise TrainingError(f"loss is {loss} at step {step}; stopping (set train.on_nan=skip "
                                                f"to skip such batches instead)")
                        skipped += 1
                        grad_norm = float("nan")
                    else:
                        _, grad_norm, _ = optimizer.step()
                    lr = optimizer.param_groups[0]["lr"]  # the rate this step used
                    scheduler.step(increment=1)
                    elapsed = time.perf_counter() - began
                    result.losses[step] = loss
                    result.last_step = step
                    if step % cfg.logging.log_interval == 0 or step == end:
                        record = {"step": step, "loss": loss, "lr": lr,
                                  "grad_norm": float(grad_norm) if grad_norm is not None else None,
                                  "tokens_per_s": tokens_per_step / elapsed,
                                  "tflops_per_s": flops_per_step / elapsed / 1e12 / max(world.world_size, 1),
                                  "step_time_s": elapsed, "skipped_batches": skipped}
                        if peak:
                            record["mfu"] = flops_per_step / elapsed / world.world_size / peak
                        logger.log(record)
                    logger.advance()
                    if cfg.train.eval_interval and step % cfg.train.eval_interval == 0:
                        logger.log({"step": step, "eval_loss": self.evaluate(model, forward_backward, forward_step,
                                                                             dp_rank)})
                    stop_now = stop.agreed()
                    if stop_now:
                        result.stopped_by_signal = True
                    save_due = cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0
                    if cfg.checkpoint.save and (save_due or step == end or stop_now):
                        self.save(step, model, optimizer, scheduler)
                    if stop_now:
                        break
        finally:
            logger.close()
        return result

    def evaluate(self, model, forward_backward, forward_step, dp_rank: int) -> float:
        iterators = self.data_source.valid_iterators(dp_rank, self.dp_size, len(model))
        if iterators is None:
            raise ConfigError("train.eval_interval is set but the data has no validation split (data.split)")
        for chunk in model:
            chunk.eval()
        with torch.no_grad():
            losses = forward_backward(forward_step_func=forward_step, data_iterator=iterators, model=model,
                                      num_microbatches=self.config.train.eval_iters,
                                      seq_length=self.config.data.seq_length,
                                      micro_batch_size=self.config.train.micro_batch_size, forward_only=True)
        for chunk in model:
            chunk.train()
        loss_sum, count = _reduce_loss(losses).tolist()
        return loss_sum / max(count, 1.0)

    def save(self, step: int, model, optimizer, scheduler) -> None:
        cfg = self.config
        meta = {"hf_config": self.hf, "config": config_to_dict(cfg), "megatron_core": megatron.core.__version__,
                "parallel": config_to_dict(cfg.parallel)}
        assets = cfg.data.tokenizer or (self.load_dir / HF_ASSETS if self.load_dir else None)
        save_checkpoint(cfg.checkpoint.save, step, model, optimizer, scheduler, meta, hf_assets_source=assets)
