"""The forward step megatron-core's schedules call for each micro-batch, and its per-token loss: the
token cross entropy that pre-training and SFT share (megaswift/objectives/token_loss.py).

The loss follows megatron-core's `calculate_per_token_loss` contract: return the SUM of weighted token
losses and the number of label tokens; the schedule and `finalize_model_grads` divide by the total
count over all micro-batches and data-parallel ranks, so the result is exactly
sum(w * ce) / (label tokens) whatever the layout.

Padded vocabulary columns (megatron's multiple of 128 x TP) are -inf in the logits already (the output
layer's hook, megaswift/models/vocab_padding.py), which covers megatron-core's vocab-parallel cross
entropy; the fused kernel is also given the true vocabulary size, so it never reads them at all.
"""
import dataclasses
from functools import partial

import torch
from megatron.core import parallel_state

from megaswift.objectives.base import TOTALS

# The sums each micro-batch's loss record carries (objectives/base.py): weighted CE sum, label tokens.
TOKEN_TOTALS = ("loss_sum", "tokens")


def batch_to_device(batch: dict) -> dict:
    """The micro-batch's tensors on the current CUDA device (PackedSeqParams' cu_seqlens included: TE's
    THD attention reads them on the GPU); unchanged without CUDA."""
    if not torch.cuda.is_available():
        return batch
    device = torch.cuda.current_device()
    move = lambda value: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
    moved = {key: move(value) for key, value in batch.items()}
    params = moved.get("packed_seq_params")
    if params is not None:
        moved["packed_seq_params"] = dataclasses.replace(params, **{
            f.name: move(getattr(params, f.name)) for f in dataclasses.fields(params)
            if isinstance(getattr(params, f.name), torch.Tensor)})
    return moved


def token_weights(batch: dict) -> torch.Tensor:
    """loss_mask (which tokens count) times the optional per-token loss scale (SFT agent data)."""
    weights = batch["loss_mask"].float()
    return weights if batch.get("loss_scale") is None else weights * batch["loss_scale"].float()


def loss_func(batch: dict, use_fused_loss: bool, vocab_size: int | None, output: torch.Tensor):
    weights = token_weights(batch)
    if use_fused_loss:
        # output: this rank's vocab shard of the logits, [b, s, v/tp]; one fused pass, weights included.
        from megaswift.kernels import loss_scaled_cross_entropy
        weighted = loss_scaled_cross_entropy(output.reshape(-1, output.shape[-1]), batch["labels"].reshape(-1),
                                             weights.reshape(-1),
                                             tp_group=parallel_state.get_tensor_model_parallel_group(),
                                             vocab_size=vocab_size)
    else:
        weighted = output.float() * weights  # GPTModel already computed vocab-parallel CE: [b, s]
    loss_sum = weighted.sum()
    num_tokens = batch["loss_mask"].sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.detach().float()])  # in TOKEN_TOTALS' order
    return loss_sum, num_tokens, {TOTALS: report}


def model_forward(model, batch: dict, use_fused_loss: bool):
    """The model's output for a micro-batch: per-token CE from GPTModel given the labels, or this rank's vocab
    shard of the logits for the fused loss."""
    kwargs = {"labels": None if use_fused_loss else batch["labels"]}
    if "packed_seq_params" in batch:
        kwargs["packed_seq_params"] = batch["packed_seq_params"]
    return model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), **kwargs)


def make_forward_step(use_fused_loss: bool = False, vocab_size: int | None = None):
    """vocab_size: the model's true vocabulary size (the HF config's), without megatron's padding."""
    def forward_step(data_iterator, model):
        batch = batch_to_device(next(data_iterator))
        return model_forward(model, batch, use_fused_loss), partial(loss_func, batch, use_fused_loss, vocab_size)
    return forward_step
