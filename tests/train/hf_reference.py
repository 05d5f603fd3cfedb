"""The reference megaswift's training must equal: a plain transformers + torch.optim.AdamW loop.

Nothing here comes from megaswift's model or loss code: the model is transformers' AutoModelForCausalLM
loaded from an HF folder (the one converted to megatron-core for the run), the loss is F.cross_entropy
over the model's own (unpadded) vocabulary, the optimizer is torch's AdamW. Only the micro-batches are
megaswift's, read from its data source, so both sides see the same tokens.

Matching settings, as megaswift configures megatron-core:
- loss of a step = sum(w x ce) / (label tokens) over all its micro-batches, w = loss_mask x loss_scale;
- AdamW (decoupled weight decay); megatron-core exempts biases and 1-D parameters (norms) from weight
  decay, so the reference does too;
- global gradient-norm clipping with torch.nn.utils.clip_grad_norm_ (the same formula as megatron-core);
- constant learning rate, no warmup.
A packed row (several samples, positions restarting at 0) is cut back into its samples and each runs
alone: what block-diagonal attention must give, computed without any attention mask.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AdamWSettings:
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    clip_grad: float  # 0: no clipping

    def flags(self) -> dict[str, str]:
        """The megaswift flags giving the same optimisation (constant lr, no warmup)."""
        return {"train.lr": str(self.lr), "train.min_lr": str(self.lr), "train.lr_decay_style": "constant",
                "train.lr_warmup_iters": "0", "train.weight_decay": str(self.weight_decay),
                "train.adam_beta1": str(self.betas[0]), "train.adam_beta2": str(self.betas[1]),
                "train.adam_eps": str(self.eps), "train.clip_grad": str(self.clip_grad)}


@dataclass
class StepResult:
    loss: float
    grad_norm: float  # before clipping, as megaswift logs it


def load_hf_model(hf_dir: str | Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")


def _samples_of_row(position_ids: torch.Tensor) -> list[slice]:
    """A row's samples: a new one starts wherever the positions restart at 0."""
    starts = (position_ids == 0).nonzero().flatten().tolist() or [0]
    ends = starts[1:] + [len(position_ids)]
    return [slice(a, b) for a, b in zip(starts, ends)]


def weighted_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of w x ce over the micro-batch, number of label tokens), one sample at a time."""
    total = torch.zeros((), dtype=torch.float32)
    weights = batch["loss_mask"].float()
    if batch.get("loss_scale") is not None:
        weights = weights * batch["loss_scale"].float()
    for row in range(batch["tokens"].shape[0]):
        for part in _samples_of_row(batch["position_ids"][row]):
            tokens = batch["tokens"][row, part].unsqueeze(0)
            positions = batch["position_ids"][row, part].unsqueeze(0)
            logits = model(input_ids=tokens, position_ids=positions).logits[0]
            ce = F.cross_entropy(logits.float(), batch["labels"][row, part], reduction="none")
            total = total + (ce * weights[row, part]).sum()
    return total, int(batch["loss_mask"].sum())


def mean_loss(model, micro_batches: list[dict]) -> torch.Tensor:
    """sum(w x ce) / (label tokens) over a list of micro-batches (one optimizer step, or an evaluation)."""
    total, count = torch.zeros((), dtype=torch.float32), 0
    for batch in micro_batches:
        loss_sum, tokens = weighted_loss_sum(model, batch)
        total, count = total + loss_sum, count + tokens
    return total / max(count, 1)


def adamw_for(model, settings: AdamWSettings) -> torch.optim.AdamW:
    decay = [p for name, p in model.named_parameters() if p.ndim > 1 and not name.endswith(".bias")]
    no_decay = [p for name, p in model.named_parameters() if p.ndim <= 1 or name.endswith(".bias")]
    return torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=settings.lr, betas=settings.betas, eps=settings.eps)


def train_reference(hf_dir: str | Path, steps: list[list[dict]], settings: AdamWSettings) -> list[StepResult]:
    """Train the HF model on `steps` (each a list of micro-batches); each step's loss and gradient norm."""
    model = load_hf_model(hf_dir)
    model.train()  # dropout is 0 in these configs; train() as a training loop would
    optimizer = adamw_for(model, settings)
    results = []
    for micro_batches in steps:
        optimizer.zero_grad(set_to_none=True)
        loss = mean_loss(model, micro_batches)
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        max_norm = settings.clip_grad if settings.clip_grad > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        results.append(StepResult(float(loss), float(norm)))
    return results


def evaluation_loss(hf_dir: str | Path, micro_batches: list[dict]) -> float:
    model = load_hf_model(hf_dir).eval()
    with torch.no_grad():
        return float(mean_loss(model, micro_batches))
