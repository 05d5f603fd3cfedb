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
from megaswift.config.validate import packed_attention, validate_choices, validate_layout
from megaswift.models import hf_to_transformer_config, resolve_hf_config
from megaswift.models.builder import build_model_chunks, use_transformer_engine
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


@dataclass
class _Session:
    """What one run holds between steps."""
    model: list
    optimizer: object
    scheduler: object
    iterators: list
    forward_backward: object
    forward_step: object
    dp_rank: int
    start_step: int
    skipped: int = 0


class _Throughput:
    """tokens/s, TFLOP/s per device and MFU (where the device's peak is known) from a step's wall time."""

    def __init__(self, hf: dict, config, world_size: int):
        self.tokens = config.train.global_batch_size * config.data.seq_length
        self.flops = flops_per_token(hf, config.data.seq_length) * self.tokens
        self.world_size, self.peak = world_size, device_peak_flops()

    def figures(self, seconds: float) -> dict:
        per_device = self.flops / seconds / self.world_size
        figures = {"tokens_per_s": self.tokens / seconds, "tflops_per_s": per_device / 1e12}
        if self.peak:
            figures["mfu"] = per_device / self.peak
        return figures


def resolve_precision(precision: str) -> torch.dtype:
    if precision == "auto":
        use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


PRECISION_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


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
                          "model.moe_token_dispatcher": config.model.moe_token_dispatcher,
                          "model.layer_spec": config.model.layer_spec})
        self.load_dir, self.weights_only = checkpoint_to_load(config)
        self.hf = read_meta(self.load_dir)["hf_config"] if self.load_dir else resolve_hf_config(config.model)
        world = world_from_env()
        te = use_transformer_engine(config.model.layer_spec)
        self.dp_size = validate_layout(self.hf, config.parallel, config.train, config.data, world.world_size, te)
        # TE attention ignores a block-diagonal mask (causal mask type): packed rows go THD there.
        self.packed_attention = packed_attention(getattr(config.data, "packing", False), te,
                                                 PRECISION_NAMES[resolve_precision(config.train.precision)],
                                                 config.parallel)

    def micro_batch_shape(self) -> tuple[int, int]:
        """(seq_length, micro_batch_size) as the schedules see them (pipeline stages exchange activations
        of this shape): a THD micro-batch is one sequence of micro_batch_size x seq_length tokens."""
        seq, micro = self.config.data.seq_length, self.config.train.micro_batch_size
        return (seq * micro, 1) if self.packed_attention == "thd" else (seq, micro)

    def run(self) -> TrainResult:
        cfg = self.config
        world = init_distributed(cfg.parallel, cfg.train.seed)
        try:
            return self._run(world)
        finally:
            shutdown_distributed()

    def _build(self):
        """Model chunks wrapped in DDP, optimizer and schedule, with megatron-core's schedule hooks set."""
        cfg = self.config
        tconfig = _model_config(self.hf, cfg)
        model = wrap_with_ddp(build_model_chunks(self.hf, tconfig, cfg.model.layer_spec), tconfig, cfg.parallel)
        optimizer = build_optimizer(model, cfg.train, cfg.parallel, tconfig.params_dtype)
        scheduler = build_scheduler(optimizer, cfg.train)
        tconfig.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
        tconfig.finalize_model_grads_func = finalize_model_grads
        tconfig.grad_scale_func = optimizer.scale_loss
        return model, optimizer, scheduler

    def _run(self, world) -> TrainResult:
        cfg = self.config
        session = self._start_session()
        start = session.start_step
        end = cfg.train.train_iters if cfg.train.exit_after_iters is None else \
            min(cfg.train.train_iters, start + cfg.train.exit_after_iters)
        logger = MetricsLogger(cfg.logging.output_dir, world.rank == 0, cfg.train.train_iters, start,
                               cfg.logging.tensorboard, cfg.logging.progress_bar)
        throughput = _Throughput(self.hf, cfg, world.world_size)
        result = TrainResult(last_step=start)
        if cfg.checkpoint.save and cfg.checkpoint.save_initial and start == 0:
            self.save(0, session)
        try:
            with StopRequest() as stop:
                for step in range(start + 1, end + 1):
                    began = time.perf_counter()
                    loss, grad_norm, lr = self._train_step(session, step)
                    elapsed = time.perf_counter() - began
                    result.losses[step], result.last_step = loss, step
                    if step % cfg.logging.log_interval == 0 or step == end:
                        logger.log({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                    **throughput.figures(elapsed), "step_time_s": elapsed,
                                    "skipped_batches": session.skipped})
                    logger.advance()
                    if cfg.train.eval_interval and step % cfg.train.eval_interval == 0:
                        logger.log({"step": step, "eval_loss": self.evaluate(session)})
                    result.stopped_by_signal = stop.agreed()
                    save_due = cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0
                    if cfg.checkpoint.save and (save_due or step == end or result.stopped_by_signal):
                        self.save(step, session)
                    if result.stopped_by_signal:
                        break
        finally:
            logger.close()
        return result

    def _start_session(self) -> _Session:
        cfg = self.config
        model, optimizer, scheduler = self._build()
        start = 0
        if self.load_dir is not None:
            if self.weights_only:
                load_checkpoint(self.load_dir, model)
            else:
                start = load_checkpoint(self.load_dir, model, optimizer, scheduler)
        dp_rank = parallel_state.get_data_parallel_rank()
        iterators = self.data_source.train_iterators(start * cfg.train.global_batch_size, dp_rank, self.dp_size,
                                                     len(model))
        return _Session(model, optimizer, scheduler, iterators, get_forward_backward_func(),
                        make_forward_step(cfg.train.fused_loss), dp_rank, start)

    def _train_step(self, session: _Session, step: int) -> tuple[float, float, float]:
        """One optimizer step over a global batch; returns (loss, grad norm, learning rate it used)."""
        cfg = self.config
        for chunk in session.model:
            chunk.zero_grad_buffer()
        session.optimizer.zero_grad()
        seq_length, micro_batch_size = self.micro_batch_shape()
        losses = session.forward_backward(
            forward_step_func=session.forward_step, data_iterator=session.iterators, model=session.model,
            num_microbatches=cfg.train.global_batch_size // (cfg.train.micro_batch_size * self.dp_size),
            seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=False)
        loss_sum, count = _reduce_loss(losses).tolist()
        loss = loss_sum / max(count, 1.0)
        grad_norm = float("nan")
        if math.isfinite(loss):
            _, norm, _ = session.optimizer.step()
            grad_norm = float(norm) if norm is not None else grad_norm
        elif cfg.train.on_nan == "stop":
            raise TrainingError(f"loss is {loss} at step {step}; stopping (set train.on_nan=skip to skip such "
                                f"batches instead)")
        else:
            session.skipped += 1
        lr = session.optimizer.param_groups[0]["lr"]
        session.scheduler.step(increment=1)
        return loss, grad_norm, lr

    def evaluate(self, session: _Session) -> float:
        model = session.model
        iterators = self.data_source.valid_iterators(session.dp_rank, self.dp_size, len(model))
        if iterators is None:
            raise ConfigError("train.eval_interval is set but the data has no validation split (data.split)")
        for chunk in model:
            chunk.eval()
        seq_length, micro_batch_size = self.micro_batch_shape()
        with torch.no_grad():
            losses = session.forward_backward(forward_step_func=session.forward_step, data_iterator=iterators,
                                              model=model, num_microbatches=self.config.train.eval_iters,
                                              seq_length=seq_length, micro_batch_size=micro_batch_size,
                                              forward_only=True)
        for chunk in model:
            chunk.train()
        loss_sum, count = _reduce_loss(losses).tolist()
        return loss_sum / max(count, 1.0)

    def save(self, step: int, session: _Session) -> None:
        cfg = self.config
        meta = {"hf_config": self.hf, "config": config_to_dict(cfg), "megatron_core": megatron.core.__version__,
                "parallel": config_to_dict(cfg.parallel)}
        assets = cfg.data.tokenizer or (self.load_dir / HF_ASSETS if self.load_dir else None)
        save_checkpoint(cfg.checkpoint.save, step, session.model, session.optimizer, session.scheduler, meta,
                        hf_assets_source=assets)
