"""Plain-torch versions of the loss-scaled cross entropy: the oracle for tests and the fallback.

`loss_scaled_cross_entropy_reference` is the peer recipe (cross entropy, then a second pass to
multiply by the weights), with ordinary autograd. The two `*_partials`/`*_backward` functions
are the torch twins of the csrc ops, used by the fused autograd Function when the extension is
not built; they work over row chunks so the fallback's extra memory stays bounded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ROW_CHUNK = 1024  # rows per chunk in the fallback: bounds its fp32 temporaries to 1024 x vocab


def loss_scaled_cross_entropy_reference(logits: torch.Tensor, labels: torch.Tensor,
                                        weights: torch.Tensor | None = None,
                                        ignore_index: int = -100, vocab_size: int | None = None) -> torch.Tensor:
    """`F.cross_entropy(reduction="none") * w` in fp32 over the full (unsplit) vocab; with `vocab_size`,
    over its first `vocab_size` columns only (the rest are padding)."""
    logits = logits if vocab_size is None else logits[:, :vocab_size]
    loss = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    return loss if weights is None else loss * weights.float()


def valid_columns(vocab_local: int, vocab_start: int, vocab_size: int) -> int:
    """How many of a shard's columns (starting at global column `vocab_start`) are real vocabulary:
    the rest are padding, which takes no part in the softmax and gets a zero gradient."""
    return min(max(vocab_size - vocab_start, 0), vocab_local)


def _owned_local_labels(labels, vocab_start, vocab_local, ignore_index):
    local = labels - vocab_start
    owned = (labels != ignore_index) & (local >= 0) & (local < vocab_local)
    return local.clamp(0, max(vocab_local - 1, 0)), owned


def cross_entropy_partials_reference(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int,
                                     vocab_size: int, ignore_index: int
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of this vocab shard, over its columns below `vocab_size`: max, sum of exp(x - max), and
    the label's logit (0 if not owned). A shard of padding only gives (-inf, 0, 0)."""
    tokens, vocab_local = logits.shape
    valid = valid_columns(vocab_local, vocab_start, vocab_size)
    row_max = torch.full((tokens,), float("-inf"), dtype=torch.float32, device=logits.device)
    sum_exp = torch.zeros_like(row_max)
    target = torch.zeros_like(row_max)
    if valid == 0:
        return row_max, sum_exp, target
    for lo in range(0, tokens, ROW_CHUNK):
        x = logits[lo:lo + ROW_CHUNK, :valid].float()
        local, owned = _owned_local_labels(labels[lo:lo + ROW_CHUNK], vocab_start, valid, ignore_index)
        m = x.max(dim=1).values
        row_max[lo:lo + ROW_CHUNK] = m
        # A row whose logits are all -inf has sum 0 (not exp(-inf - -inf) = nan), as the compiled ops.
        sum_exp[lo:lo + ROW_CHUNK] = torch.exp(x - torch.where(torch.isinf(m), 0.0, m)[:, None]).sum(dim=1)
        picked = x.gather(1, local[:, None]).squeeze(1)
        target[lo:lo + ROW_CHUNK] = torch.where(owned, picked, torch.zeros_like(picked))
    return row_max, sum_exp, target


def cross_entropy_backward_reference_(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                                      scale: torch.Tensor, vocab_start: int, vocab_size: int, ignore_index: int,
                                      out: torch.Tensor) -> torch.Tensor:
    """out = (softmax(logits) - onehot(label)) * scale[:, None] over the columns below `vocab_size`,
    exactly 0 on padding columns; `out` may be `logits` itself."""
    tokens, vocab_local = logits.shape
    valid = valid_columns(vocab_local, vocab_start, vocab_size)
    out[:, valid:] = 0
    for lo in range(0, tokens if valid else 0, ROW_CHUNK):
        x = logits[lo:lo + ROW_CHUNK, :valid].float()
        s = scale[lo:lo + ROW_CHUNK]
        local, owned = _owned_local_labels(labels[lo:lo + ROW_CHUNK], vocab_start, valid, ignore_index)
        g = torch.exp(x - lse[lo:lo + ROW_CHUNK, None]) * s[:, None]
        g.scatter_add_(1, local[:, None], torch.where(owned, -s, torch.zeros_like(s))[:, None])
        out[lo:lo + ROW_CHUNK, :valid].copy_(g)
    return out
