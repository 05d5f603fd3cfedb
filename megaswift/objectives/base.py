"""What a training objective gives the one training loop (megaswift/train/trainer.py).

The trainer owns everything an objective does not change: model chunks, DDP, the optimizer and its
schedule, megatron-core's forward-backward schedules, the resume rule, RNG, non-finite steps, stop
signals, checkpoints, evaluation and logging. An objective (`Objective`) owns what differs between
pre-training, SFT and preference training:

  data source          train / valid micro-batch iterators, from the samples consumed so far
  micro-batch          what each micro-batch dict carries: the data source makes it, the forward step
                       consumes it (tokens, labels, loss_mask, ... for the token loss)
  forward step         megatron-core's `forward_step_func(data_iterator, model) -> (output, loss_func)`;
                       `loss_func(output) -> (loss, count, {TOTALS: sums})` follows megatron-core's
                       `calculate_per_token_loss` contract: `loss` is a SUM, the schedule and
                       finalize_model_grads divide the gradients by the step's total `count` over all
                       micro-batches and data-parallel ranks
  reduction            `totals` names the sums of the step (`sums` above, one number per name, on the
                       last pipeline stage); the trainer adds them over micro-batches and ranks in ONE
                       all-reduce, then `step_metrics` turns them into the loss (which decides whether
                       the step is applied) and any extra metrics of the log line
  exchanged shape      `micro_batch_shape`: (sequence, micro-batch) of the activations pipeline stages
                       send each other

A DPO objective fits the same parts (megaswift/objectives/dpo.py; preference_losses.py is its math):
  - data source: rows of whole pairs (megaswift/data/rlhf/packing.py) with `sequence_ids` (2k chosen,
    2k+1 rejected, -1 padding) and `num_pairs`; with precomputed reference log-probs (a forward-only
    first pass over the same rows, stored beside the data) each micro-batch also carries
    `reference_chosen` / `reference_rejected` per pair, so no second model is held.
  - forward step: the model with `labels` gives -log p per token (megatron-core's vocab-parallel CE);
    `sequence_logps(-output, loss_scale, sequence_ids, num_pairs)` gives per-pair sums, then
    `preference_loss(config, policy, reference)`.
  - reduction over pairs, not tokens: `loss_func` returns (per_pair.sum() [+ the NLL term, scaled so
    that its sum over the step is nll_weight * nll_sum / nll_tokens of the step], num_pairs, sums) and
    totals = ("pair_loss_sum", "pairs", "nll_sum", "nll_tokens", "rewards/chosen", "rewards/rejected",
    "rewards/accuracies", "logps/chosen", "logps/rejected"), each metric a sum over the micro-batch's
    pairs; step_metrics divides the pair sums by "pairs" and the NLL by "nll_tokens", so every
    metric is exact over the whole global batch whatever the layout.
  - exchanged shape: unchanged (one row of seq_length tokens per micro-batch entry, THD when packed).
  - before the schedule: the optional `prepare_step(StepBatches) -> iterators` reads the step's
    micro-batches, counts the step's pairs and chosen tokens (the NLL term's exact scale) and runs a
    frozen reference copy forward-only over them (objectives/reference.py), so the training schedule
    and the exchanged shapes stay the policy's alone.
"""
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

# The key of a loss record (the third value `loss_func` returns) that holds the step's sums: a 1-D
# tensor with one entry per name of `Objective.totals`, in that order.
TOTALS = "totals"


class DataSource(Protocol):
    """Micro-batch iterators for one data-parallel rank; `count` iterators, one per virtual-pipeline chunk
    (each chunk reads its own copy: the first one the tokens, the last one the labels)."""

    def train_iterators(self, consumed_samples: int, dp_rank: int, dp_size: int, count: int) -> list: ...

    def valid_iterators(self, dp_rank: int, dp_size: int, count: int) -> list | None: ...


@dataclass(frozen=True)
class RunPlan:
    """What the trainer has settled before any process group exists, and an objective builds on."""
    config: object  # PretrainConfig, SFTConfig, ...
    hf: dict  # the model's HF config (vocab_size without megatron's padding)
    dp_size: int
    packed_attention: str | None  # None (no packing), "mask" or "thd" (megaswift/config/validate.py)
    train_samples: int  # training samples the data must provide (Trainer.train_samples)
    # te, torch or local: model.layer_spec as the trainer resolved it (models/builder.py resolve_layer_spec), for
    # objectives that build model chunks of their own; resolving `auto` again retries a Transformer Engine import.
    layer_spec: str = "auto"


ForwardStep = Callable[[object, object], tuple]  # (data_iterator, model) -> (output, loss_func)


@dataclass(frozen=True)
class StepBatches:
    """What an objective's optional `prepare_step(step) -> iterators` is given before a step's (or an
    evaluation's) schedule runs: it may read the step's micro-batches from `iterators`, run a forward-only
    pass of its own over them (`forward_backward` with forward_only=True, e.g. a reference model's) and
    return the iterators the schedule then reads (objectives/dpo.py)."""
    model: list  # the policy's model chunks (DDP-wrapped)
    iterators: list  # one per chunk
    forward_backward: object  # megatron-core's forward-backward function of this layout
    num_microbatches: int
    micro_batch_shape: tuple[int, int]
    step: int | None  # the step about to be trained; None for an evaluation


class Objective(Protocol):
    name: str  # the command that trains it: "pt", "sft", ...
    totals: tuple[str, ...]  # the names of the sums each loss record carries (see TOTALS)

    def data_source(self, plan: RunPlan) -> DataSource:
        """Built once per run, before the model; may check the data (errors name the file and what to do)."""

    def micro_batch_shape(self, plan: RunPlan) -> tuple[int, int]: ...

    def forward_step(self, plan: RunPlan) -> ForwardStep: ...

    def step_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """{"loss": ..., **extra metrics} of a step (or an evaluation) from its summed totals."""


def micro_batch_shape(plan: RunPlan) -> tuple[int, int]:
    """(seq_length, micro_batch_size) as megatron-core's schedules see them (pipeline stages exchange
    activations of this shape): a THD micro-batch is one sequence of micro_batch_size x seq_length tokens."""
    seq, micro = plan.config.data.seq_length, plan.config.train.micro_batch_size
    return (seq * micro, 1) if plan.packed_attention == "thd" else (seq, micro)


def totals_record(objective: Objective, **sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """A loss record carrying `sums` (detached, one per name of objective.totals) for the step reduction."""
    if set(sums) != set(objective.totals):
        raise ValueError(f"{objective.name} objective: expected the sums {list(objective.totals)}, "
                         f"found {sorted(sums)}")
    return {TOTALS: torch.stack([sums[name].detach().float().reshape(()) for name in objective.totals])}
