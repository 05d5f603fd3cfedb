"""`megaswift rlhf`'s objective: DPO and its loss types, SimPO and ORPO on the one training loop.

Definitions (the math is megaswift/objectives/preference_losses.py):
- per-token log-probability log pi(y_i | x, y_<i): minus megatron-core's vocab-parallel cross entropy of
  the label token (the model given `labels`), or minus megaswift.kernels' fused cross entropy
  (--train.fused_loss) on this rank's vocab shard; both are TP-exact and identical on every TP rank.
- loss scale: w_i = loss_mask_i x loss_scale_i (sft's per-token weights, --data.loss_scale) multiplies
  each token's log-probability, logp(y) = sum_i w_i log pi(y_i | ...); a weight-0 token is not counted.
  The reference's log-probs use the same weights, so with the default scale both are TRL's summed
  completion log-probs.
- one step's loss is exact over the whole global batch, whatever the layout:
      loss = (sum over the step's pairs of the per-pair loss) / pairs
             + nll_weight x (sum over chosen tokens of -w logp) / (chosen tokens)
  megatron-core divides the gradients by the step's total `count` (= pairs) over micro-batches and
  data-parallel ranks; the NLL term of each micro-batch is scaled by pairs / chosen tokens OF THE STEP,
  counted from the data before the schedule runs (`prepare_step`, one all-reduce), so its gradient is
  the token mean too. The step's metrics are sums over pairs (TOTALS), divided once reduced.

Reference log-probs (DPO's loss types; SimPO and ORPO need none), `--rlhf.reference`
(megaswift/objectives/reference.py): a frozen copy of the starting checkpoint run forward-only over the
step's micro-batches before the training schedule; a table precomputed in one forward-only pass over
the data before training and stored in the run's folder; or the adapter-disabled policy (LoRA).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megaswift.config import ConfigError
from megaswift.objectives.base import RunPlan, micro_batch_shape, totals_record
from megaswift.objectives.preference_losses import (DPO_LOSS_TYPES, REFERENCE_FREE_TYPES, PreferenceLossConfig,
                                                    SequenceLogps, preference_loss, sequence_logps)
from megaswift.train.forward_step import batch_to_device, model_forward, token_weights

RLHF_TYPES = ("dpo",) + REFERENCE_FREE_TYPES
REFERENCE_SOURCES = ("model", "precomputed", "adapters")
METRIC_SUMS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected")


def loss_config(rlhf) -> PreferenceLossConfig:
    """The loss an `RLHFConfig` asks for; an unknown type or loss is an error listing the valid ones."""
    if rlhf.type not in RLHF_TYPES:
        raise ConfigError(f"rlhf.type: expected one of {list(RLHF_TYPES)}, found {rlhf.type!r}")
    if rlhf.type == "dpo" and rlhf.loss not in DPO_LOSS_TYPES:
        hint = f" (for {rlhf.loss} use --rlhf.type {rlhf.loss})" if rlhf.loss in REFERENCE_FREE_TYPES else ""
        raise ConfigError(f"rlhf.loss: expected one of {list(DPO_LOSS_TYPES)} with rlhf.type dpo, found "
                          f"{rlhf.loss!r}{hint}")
    if rlhf.reference not in REFERENCE_SOURCES:
        raise ConfigError(f"rlhf.reference: expected one of {list(REFERENCE_SOURCES)}, found {rlhf.reference!r}")
    loss_type = rlhf.loss if rlhf.type == "dpo" else rlhf.type
    try:
        return PreferenceLossConfig(loss_type, beta=rlhf.beta, label_smoothing=rlhf.label_smoothing,
                                    rpo_alpha=rlhf.rpo_alpha, simpo_gamma=rlhf.simpo_gamma)
    except ValueError as e:
        raise ConfigError(f"rlhf: {e}") from None


def trained_chosen_tokens(batch: dict) -> int:
    """Chosen tokens with a non-zero weight: the NLL term's denominator (data only, no forward)."""
    ids = batch["sequence_ids"]
    return int(((token_weights(batch) != 0) & (ids >= 0) & (ids % 2 == 0)).sum())


def policy_token_logps(batch: dict, output: torch.Tensor, use_fused_loss: bool, vocab_size: int | None):
    """log pi per label token, shaped like batch["labels"] (see the module docstring)."""
    if not use_fused_loss:
        return -output.float()  # GPTModel with labels: vocab-parallel CE per token, [b, s]
    from megaswift.kernels import loss_scaled_cross_entropy
    ce = loss_scaled_cross_entropy(output.reshape(-1, output.shape[-1]), batch["labels"].reshape(-1),
                                   tp_group=parallel_state.get_tensor_model_parallel_group(), vocab_size=vocab_size)
    return -ce.reshape(batch["labels"].shape)


def batch_logps(batch: dict, output, use_fused_loss: bool, vocab_size: int | None) -> SequenceLogps:
    """Per-pair weighted sums of log-probs (and trained-token counts) of a micro-batch."""
    per_token = policy_token_logps(batch, output, use_fused_loss, vocab_size)
    return sequence_logps(per_token, token_weights(batch).to(per_token.device), batch["sequence_ids"],
                          int(batch["num_pairs"]))


class PreferenceObjective:
    """An `Objective` (objectives/base.py) for preference pairs (megaswift/data/rlhf/training_source.py)."""
    name = "rlhf"
    totals = ("pair_loss_sum", "pairs", "nll_sum", "nll_tokens") + METRIC_SUMS

    def __init__(self, rlhf_config):
        self.rlhf = rlhf_config
        self.loss = loss_config(rlhf_config)
        self.reference = None  # objectives/reference.py, made by the first prepare_step
        self.data = None

    # ---- data
    def data_source(self, plan: RunPlan):
        from transformers import AutoTokenizer

        from megaswift.data.rlhf.training_source import PairData
        data, t = plan.config.data, plan.config.train
        self.data = PairData(data, AutoTokenizer.from_pretrained(data.tokenizer), t.seed, t.micro_batch_size,
                             plan.packed_attention or "mask", model_vocab_size=plan.hf["vocab_size"])
        self.plan = plan
        return self.data

    def micro_batch_shape(self, plan: RunPlan) -> tuple[int, int]:
        return micro_batch_shape(plan)

    # ---- before each step's schedule
    def prepare_step(self, step) -> list:
        """Reads the step's micro-batches (every chunk's), gives each the step's NLL scale and, for DPO, the
        reference log-probs of its pairs; returns iterators over them for the training schedule."""
        batches = [[next(iterator) for _ in range(step.num_microbatches)] for iterator in step.iterators]
        pairs = sum(int(b["num_pairs"]) for b in batches[-1])
        tokens = sum(trained_chosen_tokens(b) for b in batches[-1])
        counts = torch.tensor([pairs, tokens], dtype=torch.float64,
                              device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
        if dist.is_initialized():
            dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        scale = float(counts[0]) / max(float(counts[1]), 1.0)
        for chunk_batches in batches:
            for batch in chunk_batches:
                batch["nll_scale"] = scale
        if self.loss.needs_reference:
            if self.reference is None:
                from megaswift.objectives.reference import make_reference
                self.reference = make_reference(self.rlhf.reference, self, step)
            self.reference.annotate(step, batches)
        return [iter(chunk_batches) for chunk_batches in batches]

    # ---- the forward step and its loss
    def forward_step(self, plan: RunPlan):
        self.plan = plan
        fused, vocab = plan.config.train.fused_loss, plan.hf["vocab_size"]

        def forward_step(data_iterator, model):
            original = next(data_iterator)
            batch = batch_to_device(original)
            output = model_forward(model, batch, fused)
            return output, partial(self._loss_func, original, batch, fused, vocab)
        return forward_step

    def _loss_func(self, original: dict, batch: dict, fused: bool, vocab: int, output):
        policy = batch_logps(batch, output, fused, vocab)
        reference = None
        if self.loss.needs_reference:
            if "reference_logps" not in original:
                raise RuntimeError("rlhf: a micro-batch reached the loss without reference log-probs "
                                   "(prepare_step did not run for it)")
            ref = original["reference_logps"].to(policy.chosen.device)
            reference = SequenceLogps(ref[0], ref[1], policy.chosen_tokens, policy.rejected_tokens)
        result = preference_loss(self.loss, policy, reference)
        loss = result.per_pair.sum()
        if result.nll_weight:
            loss = loss + result.nll_weight * result.nll_sum * original.get("nll_scale", 1.0)
        metrics = result.metrics
        sums = {name: metrics[name].sum() for name in METRIC_SUMS}
        pairs = torch.tensor(int(batch["num_pairs"]), dtype=torch.int, device=loss.device)
        record = totals_record(self, pair_loss_sum=result.per_pair.sum(), pairs=pairs.float(),
                               nll_sum=result.nll_sum, nll_tokens=result.nll_tokens, **sums)
        return loss, pairs, record

    def step_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        pairs = max(totals["pairs"], 1.0)
        nll = totals["nll_sum"] / max(totals["nll_tokens"], 1.0)
        nll_weight = 1.0 if self.loss.loss_type == "orpo" else self.loss.rpo_alpha
        metrics = {"loss": totals["pair_loss_sum"] / pairs + nll_weight * nll}
        metrics.update({name: totals[name] / pairs for name in METRIC_SUMS})
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        metrics["nll"] = nll
        return metrics
