"""The math of preference objectives: sequence log-probabilities, DPO and its loss types, SimPO, ORPO.

Inputs are per-token log-probabilities log pi(t_i | t_<i) of the label tokens (what megatron-core's
vocab-parallel cross entropy returns, negated), the per-token loss-scale weights w_i of the data
pipeline (0 where a token is not trained, see megaswift/data/sft/template.py), and a sequence id per
token saying which sequence it belongs to: 2k for the chosen completion of pair k, 2k+1 for its
rejected one, -1 for padding (megaswift/data/rlhf/packing.py lays pairs out that way, packed or not).

Sequence log-probability (the definition used everywhere here):

    logp(y | x) = sum_i w_i * log pi(y_i | x, y_<i)        over the tokens of the sequence
    n(y)        = #{i : w_i > 0}                           its number of trained tokens

With the default loss scale (w = 1 on the completion, 0 elsewhere) this is TRL's summed completion
log-probability. A weight scales its token's log-probability, so a token of weight 3 counts as three
times as much evidence, and weight 0 removes a token, exactly as in the SFT loss sum(w * ce) / n.
Averages (IPO, SimPO, ORPO) divide by n, the token count, as TRL divides by the completion mask sum.

Losses (per pair; `PreferenceLoss.loss` is their mean plus the NLL term), with
    delta = (logp_c - ref_c) - (logp_r - ref_r):
    sigmoid  -logsigmoid(beta * delta)                                          (DPO)
    robust   label_smoothing eps: (-(1-eps) logsigmoid(beta d) + eps logsigmoid(-beta d)) / (1 - 2 eps)
    cdpo     conservative DPO: -(1-eps) logsigmoid(beta d) - eps logsigmoid(-beta d)   (sigmoid with
             label smoothing; `sigmoid` with label_smoothing > 0 is the same loss)
    hinge    relu(1 - beta * delta)
    ipo      (delta_avg - 1 / (2 beta))^2, delta_avg using per-token averages (length-normalised, as TRL)
    simpo    reference-free: -logsigmoid(beta (avg_c - avg_r) - gamma) with label smoothing as in TRL's CPO
    orpo     reference-free: NLL(chosen) - lambda * logsigmoid(log odds(avg_c) - log odds(avg_r))
NLL term (`rpo_alpha` for DPO, always weight 1 for ORPO): -sum(logp_c) / sum(n_c) over the pairs of
the batch, the token-mean negative log-likelihood of the chosen completions.

Metrics follow TRL: rewards/chosen = beta * (logp_c - ref_c) (beta * avg_c for SimPO and ORPO),
rewards/margins = chosen - rejected, rewards/accuracies = mean(chosen > rejected), logps/* the
summed sequence log-probabilities, nll the NLL term.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "cdpo", "robust", "hinge", "ipo")
REFERENCE_FREE_TYPES = ("simpo", "orpo")
LOSS_TYPES = DPO_LOSS_TYPES + REFERENCE_FREE_TYPES


@dataclass(frozen=True)
class PreferenceLossConfig:
    """What decides the loss. `beta` is DPO's beta, SimPO's beta and ORPO's lambda."""
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0   # cdpo, robust, sigmoid, simpo
    rpo_alpha: float = 0.0         # weight of the chosen NLL added to a DPO loss (RPO)
    simpo_gamma: float = 0.5       # SimPO's target reward margin

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"preference loss type: expected one of {list(LOSS_TYPES)}, found {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError(f"preference loss beta: expected > 0, found {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"preference loss label_smoothing: expected in [0, 0.5), found {self.label_smoothing}")
        if self.rpo_alpha < 0:
            raise ValueError(f"preference loss rpo_alpha: expected >= 0, found {self.rpo_alpha}")

    @property
    def needs_reference(self) -> bool:
        return self.loss_type in DPO_LOSS_TYPES


@dataclass
class SequenceLogps:
    """Per pair: summed (weighted) log-probabilities and trained-token counts of chosen and rejected."""
    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


@dataclass
class PreferenceLoss:
    per_pair: torch.Tensor      # [pairs] the preference term of each pair
    nll_sum: torch.Tensor       # -sum of the chosen log-probs (for an exact token mean across micro-batches)
    nll_tokens: torch.Tensor    # trained chosen tokens
    nll_weight: float           # rpo_alpha (DPO) or 1 (ORPO)
    metrics: dict[str, torch.Tensor]  # per-pair tensors (detached); mean them over all pairs of a step

    @property
    def loss(self) -> torch.Tensor:
        """The loss of this batch alone: mean over pairs + nll_weight * token-mean NLL."""
        loss = self.per_pair.mean()
        if self.nll_weight:
            loss = loss + self.nll_weight * self.nll_sum / self.nll_tokens.clamp(min=1)
        return loss


def token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """log softmax(logits)[label] per position (0 where label == ignore_index); a reference for tests and
    for models that return logits (megatron's vocab-parallel cross entropy gives the same, negated)."""
    safe = labels.masked_fill(labels == ignore_index, 0)
    logps = torch.gather(logits.float().log_softmax(-1), -1, safe.unsqueeze(-1)).squeeze(-1)
    return logps.masked_fill(labels == ignore_index, 0.0)


def sequence_logps(per_token_logps: torch.Tensor, loss_scale: torch.Tensor, sequence_ids: torch.Tensor,
                   num_pairs: int) -> SequenceLogps:
    """Sum w_i * logp_i and count w_i > 0 per sequence (see the module docstring for the ids)."""
    if not per_token_logps.shape == loss_scale.shape == sequence_ids.shape:
        raise ValueError(f"sequence_logps: expected per_token_logps, loss_scale and sequence_ids of one shape, found "
                         f"{tuple(per_token_logps.shape)}, {tuple(loss_scale.shape)}, {tuple(sequence_ids.shape)}")
    logps, ids = per_token_logps.reshape(-1), sequence_ids.reshape(-1)
    weights = loss_scale.reshape(-1).to(logps.dtype)
    keep = (ids >= 0) & (weights != 0)
    index = ids.clamp(min=0).to(torch.long)
    # where() rather than a product: a -inf log-prob of an untrained token must not become NaN
    weighted = torch.where(keep, weights * logps, torch.zeros_like(logps))
    zeros = torch.zeros(2 * num_pairs, dtype=logps.dtype, device=logps.device)
    sums = zeros.index_add(0, index, weighted)
    counts = zeros.index_add(0, index, keep.to(logps.dtype))
    return SequenceLogps(sums[0::2], sums[1::2], counts[0::2], counts[1::2])


def _smoothed_sigmoid(logits: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _dpo_terms(config: PreferenceLossConfig, policy: SequenceLogps, reference: SequenceLogps):
    chosen_ratio, rejected_ratio = policy.chosen - reference.chosen, policy.rejected - reference.rejected
    delta = chosen_ratio - rejected_ratio
    beta, eps = config.beta, config.label_smoothing
    if config.loss_type in ("sigmoid", "cdpo"):
        per_pair = _smoothed_sigmoid(beta * delta, eps)
    elif config.loss_type == "robust":
        per_pair = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif config.loss_type == "hinge":
        per_pair = torch.relu(1 - beta * delta)
    else:  # ipo
        average = (chosen_ratio / policy.chosen_tokens.clamp(min=1)
                   - rejected_ratio / policy.rejected_tokens.clamp(min=1))
        per_pair = (average - 1 / (2 * beta)) ** 2
    return per_pair, beta * chosen_ratio, beta * rejected_ratio


def _reference_free_terms(config: PreferenceLossConfig, policy: SequenceLogps):
    chosen_avg = policy.chosen / policy.chosen_tokens.clamp(min=1)
    rejected_avg = policy.rejected / policy.rejected_tokens.clamp(min=1)
    if config.loss_type == "simpo":
        per_pair = _smoothed_sigmoid(config.beta * (chosen_avg - rejected_avg) - config.simpo_gamma,
                                     config.label_smoothing)
    else:  # orpo: log odds(p) = log p - log(1 - p), with p the per-token average probability
        log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
        per_pair = -config.beta * F.logsigmoid(log_odds)
    return per_pair, config.beta * chosen_avg, config.beta * rejected_avg


def preference_loss(config: PreferenceLossConfig, policy: SequenceLogps,
                    reference: SequenceLogps | None = None) -> PreferenceLoss:
    """The loss and metrics of a batch of pairs (see the module docstring)."""
    if config.needs_reference:
        if reference is None:
            raise ValueError(f"preference loss {config.loss_type!r} needs reference log-probs, found none "
                             f"(the reference-free types are {list(REFERENCE_FREE_TYPES)})")
        per_pair, chosen_rewards, rejected_rewards = _dpo_terms(config, policy, reference)
        nll_weight = config.rpo_alpha
    else:
        per_pair, chosen_rewards, rejected_rewards = _reference_free_terms(config, policy)
        nll_weight = 1.0 if config.loss_type == "orpo" else config.rpo_alpha
    nll_sum, nll_tokens = -policy.chosen.sum(), policy.chosen_tokens.sum()
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        "logps/chosen": policy.chosen.detach(),
        "logps/rejected": policy.rejected.detach(),
        "nll": (nll_sum / nll_tokens.clamp(min=1)).detach().expand_as(per_pair),
    }
    return PreferenceLoss(per_pair, nll_sum, nll_tokens, nll_weight, metrics)
