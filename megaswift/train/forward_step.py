"""The forward step megatron-core's schedules call for each micro-batch, and its per-token loss.

The loss follows megatron-core's `calculate_per_token_loss` contract: return the SUM of weighted token
losses and the number of label tokens; the schedule and `finalize_model_grads` divide by the total
count over all micro-batches and data-parallel ranks, so the result is exactly
sum(w * ce) / (label tokens) whatever the layout.
"""
from functools import partial

import torch
from megatron.core import parallel_state


def _per_token_loss(batch: dict, output: torch.Tensor, use_fused_loss: bool) -> torch.Tensor:
    if not use_fused_loss:
        return output.float()  # GPTModel already computed vocab-parallel CE: [b, s]
    from megaswift.kernels import loss_scaled_cross_entropy
    logits = output.transpose(0, 1).contiguous() if output.shape[0] != batch["labels"].shape[0] else output
    labels = batch["labels"]
    flat = loss_scaled_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                     tp_group=parallel_state.get_tensor_model_parallel_group())
    return flat.view_as(labels)


def loss_func(batch: dict, use_fused_loss: bool, output: torch.Tensor):
    losses = _per_token_loss(batch, output, use_fused_loss)
    mask = batch["loss_mask"].float()
    weights = batch.get("loss_scale")
    weighted = losses * mask if weights is None else losses * mask * weights.float()
    loss_sum = weighted.sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.detach().float()])
    return loss_sum, num_tokens, {"loss": report}


def make_forward_step(use_fused_loss: bool = False):
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        kwargs = {"labels": None if use_fused_loss else batch["labels"]}
        if "packed_seq_params" in batch:
            kwargs["packed_seq_params"] = batch["packed_seq_params"]
        output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), **kwargs)
        return output, partial(loss_func, batch, use_fused_loss)
    return forward_step
