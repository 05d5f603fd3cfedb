"""Loss-scaled (vocab-parallel) cross entropy fused in one op: per-token `w * ce`, no second pass.

The logits are CONSUMED: backward writes the logits' gradient into the logits buffer in place
(pass `inplace_backward=False` to keep them), so no second logits-sized tensor is ever allocated.
With `tp_group`, `logits` is this rank's contiguous vocab shard as megatron-core splits it: rank r
owns columns [r * V_local, (r + 1) * V_local). `vocab_size` is the TRUE vocabulary size: columns
at or past it (megatron's padding to a multiple of 128 x TP) take no part in the softmax and get an
exactly zero gradient, whichever rank holds them. The compiled op returns per-row partials (max,
sum of exponentials, target logit); the collectives that combine them across ranks live here.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megaswift.kernels import _dispatch
from megaswift.kernels.cross_entropy_reference import (
    cross_entropy_backward_reference_,
    cross_entropy_partials_reference,
)

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _partials(logits, labels, vocab_start, vocab_size, ignore_index):
    ext = _dispatch.extension_for("loss_scaled_cross_entropy", logits.device.type)
    if ext is None:
        return cross_entropy_partials_reference(logits, labels, vocab_start, vocab_size, ignore_index)
    return ext.cross_entropy_partials(logits, labels, vocab_start, vocab_size, ignore_index)


def _backward_(logits, labels, lse, scale, vocab_start, vocab_size, ignore_index, out):
    ext = _dispatch.extension_for("loss_scaled_cross_entropy", logits.device.type)
    if ext is None:
        return cross_entropy_backward_reference_(logits, labels, lse, scale, vocab_start, vocab_size, ignore_index,
                                                 out)
    ext.cross_entropy_backward_(logits, labels, lse, scale, vocab_start, vocab_size, ignore_index, out)
    # The compiled op writes through a raw pointer, so record the write: if the op that produced
    # the logits saved them for its own backward (tanh soft-capping, say), autograd then raises
    # instead of silently using overwritten values.
    torch.autograd.graph.increment_version(out)
    return out


class _LossScaledCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, weights, ignore_index, tp_group, inplace_backward, vocab_size):
        vocab_start = vocab_start_of(logits, tp_group)
        row_max, sum_exp, target = _partials(logits, labels, vocab_start, vocab_size, ignore_index)
        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
            # Sums rescaled to the common max, and target logits (zero where not owned): one SUM. A rank
            # holding only padding has (max, sum) = (-inf, 0): exp(-inf - max) = 0 adds nothing.
            sums = torch.stack([sum_exp * torch.exp(row_max - global_max), target])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)
            row_max, sum_exp, target = global_max, sums[0], sums[1]
        lse = row_max + torch.log(sum_exp)
        valid = labels != ignore_index
        w = valid.float() if weights is None else torch.where(valid, weights.float(), 0.0)
        loss = torch.where(valid, (lse - target) * w, 0.0)  # exactly 0 where ignored, even if lse is inf
        ctx.save_for_backward(logits, labels, lse, w)
        ctx.vocab_start, ctx.ignore_index, ctx.inplace = vocab_start, ignore_index, inplace_backward
        ctx.vocab_size = vocab_size
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, labels, lse, w = ctx.saved_tensors
        scale = (grad_loss.float() * w).contiguous()
        out = logits if ctx.inplace else torch.empty_like(logits)
        grad = _backward_(logits, labels, lse, scale, ctx.vocab_start, ctx.vocab_size, ctx.ignore_index, out)
        return grad, None, None, None, None, None, None


def vocab_start_of(logits: torch.Tensor, tp_group) -> int:
    if tp_group is None:
        return 0
    return dist.get_rank(tp_group) * logits.shape[-1]


def check_inputs(logits, labels, weights, ignore_index, vocab_size, tp=1):
    """Raise with expected vs found for anything the kernels would otherwise misread."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [tokens, vocab_local], found shape {tuple(logits.shape)}; "
                         f"flatten leading dims with logits.view(-1, logits.shape[-1])")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits dtype must be one of {LOGIT_DTYPES}, found {logits.dtype}")
    if not logits.is_contiguous():
        raise ValueError(f"logits must be contiguous (shape {tuple(logits.shape)}, strides "
                         f"{logits.stride()}); backward writes into them in place, so pass a contiguous "
                         f"buffer (e.g. .contiguous(), which copies)")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be torch.int64, found {labels.dtype}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must be [tokens] = [{logits.shape[0]}], found {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits on {logits.device}")
    if weights is not None:
        if not weights.is_floating_point():
            raise TypeError(f"weights must be a floating tensor, found {weights.dtype}")
        if weights.shape != logits.shape[:1]:
            raise ValueError(f"weights must be [tokens] = [{logits.shape[0]}], found {tuple(weights.shape)}")
        if weights.device != logits.device:
            raise ValueError(f"weights are on {weights.device} but logits on {logits.device}")
    width = logits.shape[-1] * tp
    if not 0 < vocab_size <= width:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {width}] (the logits' vocab width "
                         f"{logits.shape[-1]} x {tp} tensor-parallel ranks); pass the model's true vocabulary "
                         f"size, without megatron's padding")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):  # one host sync; a wrong label must never become a silent wrong loss
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"label {int(labels[i])} at token {i} is outside [0, {vocab_size}) and is not "
                         f"ignore_index={ignore_index}")


def loss_scaled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                              weights: torch.Tensor | None = None, ignore_index: int = -100,
                              tp_group=None, inplace_backward: bool = True,
                              vocab_size: int | None = None) -> torch.Tensor:
    """Per-token fp32 loss `weights * cross_entropy(logits, labels)`, 0 where labels == ignore_index.

    logits: [tokens, vocab_local] fp32/bf16/fp16, contiguous (accumulation is fp32).
    labels: [tokens] int64 global vocab ids. weights: [tokens] float or None (all ones).
    tp_group: the tensor-parallel group when logits are a vocab shard; the result then equals the
    unsplit computation on every rank. Backward overwrites `logits` with their gradient unless
    inplace_backward=False (needed when the op producing the logits saves its output for its own
    backward, e.g. tanh soft-capping; autograd raises a clear error if you forget). `weights`
    are constants: they receive no gradient. vocab_size: the true vocabulary size (default: every
    column of every shard); columns at or past it are padding, outside the softmax, zero gradient.
    """
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    vocab_size = logits.shape[-1] * tp if vocab_size is None else int(vocab_size)
    check_inputs(logits, labels, weights, ignore_index, vocab_size, tp)
    weights = None if weights is None else weights.contiguous()
    return _LossScaledCrossEntropy.apply(logits, labels.contiguous(), weights, ignore_index, tp_group,
                                         inplace_backward, vocab_size)
