"""The training loop: megatron-core model chunks, DDP, optimizer and forward-backward schedules.

One loop serves every command: `Trainer(config, objective)`, where the objective (megaswift/objectives/
base.py) brings the data source, the forward step and its loss, the step's reduction and metrics, and
the micro-batch shape pipeline stages exchange; `megaswift pt` and `megaswift sft` differ only in it.
"""
import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megaswift.checkpointing import rng
from megaswift.checkpointing.foreign import load_foreign_weights
from megaswift.checkpointing.integrity import intact_checkpoint
from megaswift.checkpointing.layout import HF_ASSETS, iteration_dir, read_meta
from megaswift.checkpointing.lock import hold_checkpoint_folder
from megaswift.checkpointing.retention import apply_retention, check_retention_settings
from megaswift.checkpointing.state import check_base_intact, load_checkpoint, save_checkpoint
from megaswift.config import ConfigError, config_to_dict
from megaswift.config.validate import packed_attention, validate_choices, validate_layout
from megaswift.models import hf_to_transformer_config, resolve_hf_config
from megaswift.models.builder import build_model_chunks, resolve_layer_spec
from megaswift.models.mcore_config import Accelerators, check_performance_settings, detect_accelerators
from megaswift.config.megatron_fields import split_by_owner
from megaswift.objectives.base import TOTALS, DataSource, Objective, RunPlan, StepBatches
from megaswift.platform.cpu import cpu_patches
from megaswift.platform.versions import installed_version
from megaswift.train.distributed import init_distributed, shutdown_distributed, world_from_env
from megaswift.train.checkpoint_eval import CheckpointEvaluator, check_eval_settings
from megaswift.train.metrics import (MetricsLogger, default_output_dir, device_peak_flops, flops_per_token,
                                     write_run_config)
from megaswift.train.optimizer import (build_optimizer, build_scheduler, ddp_config_for, parameters_gathered,
                                      wrap_with_ddp)
from megaswift.tuners import apply_tuner, check_tuner_settings
from megaswift.train.nonfinite import SkippedSteps
from megaswift.train.preemption import StopRequest
from megaswift.train.resume import (adapter_checkpoint_meta, changed_settings, check_adapter_start,
                                    check_resume_changes, checkpoint_to_load, describe_changes, describe_start,
                                    model_of_checkpoint)


class TrainingError(RuntimeError):
    pass


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
    micro_batch_shape: tuple[int, int]  # (seq_length, micro_batch_size) the schedules are given
    dp_rank: int
    start_step: int
    consumed_samples: int = 0  # recorded in each checkpoint: a changed global batch resumes at the right sample


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


@dataclass
class StepOutcome:
    loss: float
    metrics: dict  # the objective's other metrics of the step (objectives/base.py), for the log line
    grad_norm: float | None  # None when the optimizer was not called (a non-finite loss) or fp16 overflowed
    lr: float  # the learning rate the step used (or would have used)
    applied: bool  # the optimizer updated the weights
    stop_agreed: bool  # some rank had been asked to stop (preemption.py) when the step's loss was reduced


def reduce_step_totals(losses_reduced: list, names: tuple[str, ...],
                       stop_requested: bool = False) -> tuple[dict[str, float], bool]:
    """(the objective's sums by name, stop agreed) of a step, identical on every rank, from ONE all-reduce
    over all ranks. The loss records (each with its sums under TOTALS, in the order of `names`) exist on the
    last pipeline stage only, alike on its tensor-parallel ranks: those of TP rank 0 contribute them (so each
    data-parallel and context-parallel share counts once). Every rank adds its stop request, so a signal
    that reached any rank stops all of them after this step, with no collective of its own; the sums stay
    on the device until the one copy to the host."""
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    width = len(names)
    totals = torch.zeros(width + 1, dtype=torch.float64, device=device)
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        for record in losses_reduced:
            totals[:width] += record[TOTALS].detach().to(device, torch.float64)
    totals[width] = 1.0 if stop_requested else 0.0
    dist.all_reduce(totals)
    *sums, stops = totals.tolist()
    return dict(zip(names, sums)), stops > 0


def _model_config(hf: dict, config, accelerators: Accelerators):
    """The TransformerConfig the Trainer builds the model with: the model, layout, precision, `perf` and the
    `megatron` pass-through (checked and parsed by Trainer.__init__, models/mcore_config.py)."""
    on_gpu = accelerators.gpu
    transformer_fields, _ = split_by_owner(config.megatron)
    tconfig = hf_to_transformer_config(hf, config.parallel, resolve_precision(config.train.precision),
                                       config.model.moe_token_dispatcher, config.model.init_std, on_gpu=on_gpu,
                                       perf=config.perf, accelerators=accelerators, megatron=transformer_fields)
    # Batched p2p on gloo gives silently wrong interleaved-pipeline results at PP=2 (mcore-on-cpu.md).
    tconfig.batch_p2p_comm = on_gpu
    tconfig.overlap_p2p_comm = False
    return tconfig


class Trainer:
    def __init__(self, config, objective: Objective, world_size: int | None = None):
        # world_size: checks a layout for that many processes (megaswift launch, before starting them)
        self.config, self.objective = config, objective
        self.data_source: DataSource | None = None  # prepare_data() (or run()) has the objective build it
        validate_choices({"train.lr_decay_style": config.train.lr_decay_style,
                          "train.precision": config.train.precision, "train.on_nan": config.train.on_nan,
                          "model.moe_token_dispatcher": config.model.moe_token_dispatcher,
                          "model.layer_spec": config.model.layer_spec})
        self.skips = SkippedSteps.for_run(config.train)  # non-finite steps (train/nonfinite.py)
        check_eval_settings(config)  # the `eval` section's checkpoint benchmarks (train/checkpoint_eval.py)
        # The resume rule (train/resume.py): checkpoint.save's latest wins, checkpoint.load only seeds a run.
        self.start = checkpoint_to_load(config)
        self.load_dir, self.weights_only = self.start.folder, self.start.weights_only
        self.hf = model_of_checkpoint(self.start, config.model.overrides) if self.load_dir else \
            resolve_hf_config(config.model)
        self.setting_changes = changed_settings(self.start.recorded_config(), config) if self.start.resumed else []
        check_resume_changes(self.start, self.setting_changes)
        check_adapter_start(self.start, config)  # LoRA/DoRA: a base to save against, unchanged adapter settings
        check_tuner_settings(config.tuner, self.hf)  # type, rank, targets and modules_to_save against the model
        world = world_from_env()
        # Once per run: each detection tries to import Transformer Engine (a failed import is retried every
        # time), so the answer and the layer spec it decides are kept and passed down.
        self.accelerators = detect_accelerators(config.model.layer_spec)
        self.layer_spec = layer_spec = resolve_layer_spec(config.model.layer_spec,  # te, torch or local
                                                          self.accelerators.transformer_engine)
        te = layer_spec == "te"
        self.dp_size = validate_layout(self.hf, config.parallel, config.train, config.data,
                                       world_size or world.world_size, te)
        # perf and the megatron pass-through (parsed by each field's type, kept in that JSON form)
        config.megatron = check_performance_settings(config, self.hf, self.accelerators,
                                                     PRECISION_NAMES[resolve_precision(config.train.precision)])
        # TE attention ignores a block-diagonal mask (causal mask type): packed rows go THD there, and with the
        # torch spec on a GPU (FlexAttention from cu_seqlens, no dense mask per row).
        self.packed_attention = packed_attention(getattr(config.data, "packing", False), layer_spec,
                                                 PRECISION_NAMES[resolve_precision(config.train.precision)],
                                                 config.parallel, on_gpu=torch.cuda.is_available())

    def plan(self) -> RunPlan:
        """What this run has settled, for the objective to build on."""
        return RunPlan(self.config, self.hf, self.dp_size, self.packed_attention, self.train_samples(),
                       self.layer_spec)

    def prepare_data(self) -> DataSource:
        """The objective's data source for this run, built (and its data checked) once; before any process
        group exists when the CLI calls it, so its errors are the same on every rank."""
        if self.data_source is None:
            self.data_source = self.objective.data_source(self.plan())
        return self.data_source

    def micro_batch_shape(self) -> tuple[int, int]:
        """(seq_length, micro_batch_size) as the schedules see them: pipeline stages exchange activations of
        this shape (the objective's: a THD micro-batch is one sequence of micro_batch_size x seq_length)."""
        return self.objective.micro_batch_shape(self.plan())

    def train_samples(self) -> int:
        """Training samples the data must provide: those consumed before plus the remaining steps at this
        run's global batch (at least what the first run asked for, so the sample order is built alike)."""
        t, start = self.config.train, self.start
        needed = start.consumed_samples() + max(t.train_iters - start.step, 0) * t.global_batch_size
        recorded = start.recorded_config().get("train", {})
        first_run = recorded.get("train_iters", 0) * recorded.get("global_batch_size", 0)
        return max(needed, first_run)

    def _announce_start(self, world) -> bool:
        """Rank 0 says once where the run starts and why; False when a finished run is rerun."""
        cfg, start = self.config, self.start
        finished = start.resumed and start.step >= cfg.train.train_iters
        if world.rank == 0:
            print(describe_start(start, cfg.train.train_iters), flush=True)
            changes = describe_changes(self.setting_changes, start)
            if changes:
                print(changes, flush=True)
            if finished:
                print(f"megaswift: nothing to train: {start.folder} is at step {start.step} and train.train_iters is "
                      f"{cfg.train.train_iters}, so this run is complete (raise --train.train_iters to train "
                      f"further)", flush=True)
        return not finished

    def run(self) -> TrainResult:
        cfg = self.config
        check_retention_settings(cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)
        # A library caller's process gets torch back as it was; megaswift's own entry points have applied
        # the CPU patches for good already, so for them this applies and undoes nothing.
        with cpu_patches():
            world = init_distributed(cfg.parallel, cfg.train.seed)
            try:
                # One run per checkpoint.save folder, for the whole run (checkpointing/lock.py).
                with hold_checkpoint_folder(cfg.checkpoint.save):
                    self._use_intact_checkpoint()
                    return self._run(world)
            finally:
                shutdown_distributed()

    def _use_intact_checkpoint(self) -> None:
        """Checks the checkpoint to load against its recorded sums (checkpoint.verify) before anything is
        announced or built; with checkpoint.fallback a damaged one is replaced by the newest intact earlier one."""
        ck = self.config.checkpoint
        if self.load_dir is None or not ck.verify:
            return
        intact = intact_checkpoint(self.load_dir, ck.fallback)
        if intact != self.load_dir:
            self.start = dataclasses.replace(self.start, folder=intact, meta=read_meta(intact))
            self.load_dir = intact
        if self.start.base is not None and self.start.base != self.load_dir:  # an adapter checkpoint's frozen base
            check_base_intact(self.start.base, self.load_dir)

    def _build(self):
        """Model chunks wrapped in DDP, optimizer and schedule, with megatron-core's schedule hooks set."""
        cfg = self.config
        tconfig = _model_config(self.hf, cfg, self.accelerators)
        chunks = apply_tuner(build_model_chunks(self.hf, tconfig, self.layer_spec), cfg.tuner, self.hf)
        model = wrap_with_ddp(chunks, tconfig, cfg.parallel,
                              ddp_config_for(cfg.parallel, cfg.perf, split_by_owner(cfg.megatron)[1]))
        optimizer = build_optimizer(model, cfg.train, cfg.parallel, tconfig.params_dtype, cfg.perf)
        scheduler = build_scheduler(optimizer, cfg.train)
        tconfig.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
        tconfig.finalize_model_grads_func = finalize_model_grads
        tconfig.grad_scale_func = optimizer.scale_loss
        return model, optimizer, scheduler

    def _run(self, world) -> TrainResult:
        cfg = self.config
        if not self._announce_start(world):
            return TrainResult(last_step=self.start.step)
        session = self._start_session()
        start = session.start_step
        end = cfg.train.train_iters if cfg.train.exit_after_iters is None else \
            min(cfg.train.train_iters, start + cfg.train.exit_after_iters)
        if not cfg.logging.output_dir:  # a Trainer built without the CLI (cli/run_config.py resolves it)
            cfg.logging.output_dir = default_output_dir(cfg.checkpoint.save)
        if world.rank == 0:
            write_run_config(cfg.logging.output_dir, config_to_dict(cfg))
        logger = MetricsLogger(cfg.logging.output_dir, world.rank == 0, cfg.train.train_iters, start,
                               cfg.logging.tensorboard, cfg.logging.progress_bar)
        throughput = _Throughput(self.hf, cfg, world.world_size)
        result = TrainResult(last_step=start)
        evaluations = CheckpointEvaluator(cfg, world.rank == 0, logger.log)  # benchmarks on saved checkpoints
        try:
            with StopRequest(saving=bool(cfg.checkpoint.save)) as stop:
                if cfg.checkpoint.save and cfg.checkpoint.save_initial and start == 0:
                    self.save(0, session)
                for step in range(start + 1, end + 1):
                    began = time.perf_counter()
                    outcome = self._train_step(session, step, stop)
                    session.consumed_samples += cfg.train.global_batch_size  # a skipped step's batch too
                    elapsed = time.perf_counter() - began
                    result.losses[step], result.last_step = outcome.loss, step
                    result.stopped_by_signal = outcome.stop_agreed
                    if step % cfg.logging.log_interval == 0 or step == end or result.stopped_by_signal:
                        logger.log({"step": step, "loss": outcome.loss, **outcome.metrics, "lr": outcome.lr,
                                    "grad_norm": outcome.grad_norm, **throughput.figures(elapsed),
                                    "step_time_s": elapsed, **self._skip_counts()})
                    logger.advance()
                    # A stop keeps the grace period (Slurm's --signal=...@SECONDS) for the save.
                    if cfg.train.eval_interval and step % cfg.train.eval_interval == 0 and \
                            not result.stopped_by_signal:
                        logger.log({"step": step, **{f"eval_{name}": value
                                                     for name, value in self.evaluate(session).items()}})
                    if result.stopped_by_signal and world.rank == 0:
                        print(f"megaswift: stop requested (SIGTERM); step {step} is the last one"
                              f"{', saving it' if cfg.checkpoint.save else ' (checkpoint.save is not set)'}",
                              flush=True)
                    save_due = cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0
                    if cfg.checkpoint.save and (save_due or step == end or result.stopped_by_signal):
                        self.save(step, session)
                        evaluations.checkpoint_saved(step, iteration_dir(cfg.checkpoint.save, step),
                                                     last=step == end, stopping=result.stopped_by_signal)
                    evaluations.poll()
                    if result.stopped_by_signal:
                        break
        except BaseException:
            evaluations.close(wait=False)  # an error or Ctrl-C: stop the evaluations, never wait for them
            raise
        finally:
            evaluations.close()  # waits (eval.wait_s at most) for the evaluations still running
            logger.close()
        return result

    def _start_session(self) -> _Session:
        model, optimizer, scheduler = self._build()
        start = 0
        if self.load_dir is not None:
            if self.start.foreign is not None:  # another trainer's checkpoint, opened and checked in __init__
                load_foreign_weights(self.start.foreign, model)
            elif self.weights_only:
                load_checkpoint(self.load_dir, model, verify=False)  # verified in run()
            else:  # the full state, RNG included (checkpointing/rng.py)
                start = load_checkpoint(self.load_dir, model, optimizer, scheduler, verify=False)
        consumed = self.start.consumed_samples()
        dp_rank = parallel_state.get_data_parallel_rank()
        with rng.preserved():  # whatever building the data draws, training continues from the same RNG state
            iterators = self.prepare_data().train_iterators(consumed, dp_rank, self.dp_size, len(model))
        plan = self.plan()
        return _Session(model, optimizer, scheduler, iterators, get_forward_backward_func(),
                        self.objective.forward_step(plan), self.objective.micro_batch_shape(plan), dp_rank, start,
                        consumed_samples=consumed)

    def _skip_counts(self) -> dict:
        counts = {"skipped_steps": self.skips.total}
        if resolve_precision(self.config.train.precision) == torch.float16:
            counts["loss_scale_skips"] = self.skips.loss_scale_overflows
        return counts

    def _train_step(self, session: _Session, step: int, stop: StopRequest | None = None) -> StepOutcome:
        """One step over a global batch. Its update is applied only when the loss and the gradient norm are
        finite; otherwise train.on_nan decides what follows (train/nonfinite.py). A stop signal that has
        arrived by the time the loss is reduced ends the run after this step."""
        cfg = self.config
        for chunk in session.model:
            chunk.zero_grad_buffer()
        session.optimizer.zero_grad()
        seq_length, micro_batch_size = session.micro_batch_shape
        num_microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * self.dp_size)
        losses = session.forward_backward(
            forward_step_func=session.forward_step, model=session.model, num_microbatches=num_microbatches,
            data_iterator=self._prepared(session, session.iterators, num_microbatches, step),
            seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=False)
        totals, stop_agreed = reduce_step_totals(losses, self.objective.totals,
                                                 stop is not None and stop.requested)
        metrics = self.objective.step_metrics(totals)
        loss = metrics.pop("loss")
        lr = session.optimizer.param_groups[0]["lr"]
        applied, grad_norm = False, None
        if math.isfinite(loss):  # the same on every rank: all of them enter the optimizer's collectives, or none
            # False for a non-finite gradient norm (optimizer.FiniteUpdatesOptimizer) or an fp16 overflow
            applied, grad_norm, _ = session.optimizer.step()
            grad_norm = None if grad_norm is None else float(grad_norm)
        if applied:
            session.scheduler.step(increment=1)  # the schedule counts applied updates
            self.skips.applied()
        elif math.isfinite(loss) and grad_norm is None:
            self.skips.loss_scale_overflows += 1  # megatron-core's fp16 loss scaler: it lowers the scale
        else:
            problem = self.skips.not_applied(step, loss, grad_norm)
            if problem:
                raise TrainingError(problem)
        return StepOutcome(loss, metrics, grad_norm, lr, applied, stop_agreed)

    def _prepared(self, session: _Session, iterators: list, num_microbatches: int, step: int | None) -> list:
        """The iterators a schedule reads: the objective's optional prepare_step (objectives/base.py
        StepBatches) may read the micro-batches first, e.g. to run a reference model over them."""
        prepare = getattr(self.objective, "prepare_step", None)
        if prepare is None:
            return iterators
        return prepare(StepBatches(session.model, iterators, session.forward_backward, num_microbatches,
                                   session.micro_batch_shape, step))

    def evaluate(self, session: _Session) -> dict[str, float]:
        """The objective's metrics ("loss" first) over train.eval_iters micro-batches of the validation split."""
        model = session.model
        iterators = self.prepare_data().valid_iterators(session.dp_rank, self.dp_size, len(model))
        if iterators is None:
            raise ConfigError("train.eval_interval is set but the data has no validation split (data.split)")
        for chunk in model:
            chunk.eval()
        seq_length, micro_batch_size = session.micro_batch_shape
        iterators = self._prepared(session, iterators, self.config.train.eval_iters, None)
        with torch.no_grad():
            losses = session.forward_backward(forward_step_func=session.forward_step, data_iterator=iterators,
                                              model=model, num_microbatches=self.config.train.eval_iters,
                                              seq_length=seq_length, micro_batch_size=micro_batch_size,
                                              forward_only=True)
        for chunk in model:
            chunk.train()
        totals, _ = reduce_step_totals(losses, self.objective.totals)
        return self.objective.step_metrics(totals)

    def save(self, step: int, session: _Session) -> None:
        cfg = self.config
        meta = {"hf_config": self.hf, "config": config_to_dict(cfg),
                "megatron_core": installed_version("megatron-core"),  # not megatron.core.__version__ (git-derived)
                "parallel": config_to_dict(cfg.parallel), "consumed_samples": session.consumed_samples,
                **adapter_checkpoint_meta(self.start, cfg)}  # LoRA/DoRA: adapters only, on the recorded base
        assets = cfg.data.tokenizer or (self.load_dir / HF_ASSETS if self.load_dir else None)
        with parameters_gathered(session.model):  # perf.overlap_param_gather: every rank's weights up to date
            save_checkpoint(cfg.checkpoint.save, step, session.model, session.optimizer, session.scheduler, meta,
                            hf_assets_source=assets)
        if dist.get_rank() == 0:  # only now that the new checkpoint is complete and `latest` names it
            print(f"megaswift: checkpoint saved to {iteration_dir(cfg.checkpoint.save, step)} (step {step})",
                  flush=True)
            for folder in apply_retention(cfg.checkpoint.save, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every):
                print(f"megaswift: removed {folder} (checkpoint.keep_last={cfg.checkpoint.keep_last}"
                      f"{f', keep_every={cfg.checkpoint.keep_every}' if cfg.checkpoint.keep_every else ''})",
                      flush=True)
