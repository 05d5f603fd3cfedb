"""Padded vocabulary columns never take part in a softmax: they are set to -inf at the output layer.

megatron-core pads the vocabulary to a multiple of 128 x TP (mcore_config.padded_vocab_size) so that
embedding and output shards stay equal. The extra columns are not tokens, but the output layer still
computes a logit for each; left alone they enter every softmax (as 0 logits at initialisation, so a
vocab-1000 model padded to 1024 trains a 1024-way softmax: 3.4e-3 relative above transformers' loss)
and their output rows are trained on nothing.

Why a forward hook on the output layer that writes -inf into the padding columns of its result:
- exact: exp(-inf) is exactly 0 in every dtype, so the max, the sum of exponentials, the softmax and
  the gradient are those over the true vocabulary, bit for bit as if the columns did not exist;
- one place for every consumer: megatron-core's vocab-parallel cross entropy, `--train.fused_loss`,
  evaluation and any logits returned to a caller (a sampler never picks a -inf token) all read the
  output layer's result, and the multi-token-prediction heads call the same module;
- cheap: an in-place fill of the padding columns only (fewer than 128 x TP of them), on the one TP
  rank (or the few ranks) holding them; no logits-sized copy. The fill's backward gives those
  columns a zero gradient, so the padding rows of the output layer (and of a tied embedding) get none.
-inf rather than a large negative number: a finite sentinel can be overtaken by real logits (fp16
overflow, a temperature division) and then take probability; -inf cannot.
"""
import torch
import torch.distributed as dist


def padding_columns(true_vocab: int, width: int, column_start: int) -> slice | None:
    """The columns of a [.., width] logits block starting at global column `column_start` that lie
    past the true vocabulary, or None when the block holds none."""
    first_pad = max(true_vocab - column_start, 0)
    return slice(first_pad, width) if first_pad < width else None


def _column_start(width: int, padded_vocab: int, tp_group) -> int:
    """Where this logits block starts: 0 when it holds the whole vocab (TP=1, or gathered by a
    `runtime_gather_output=True` call), else this rank's contiguous shard, as megatron splits it."""
    if width == padded_vocab or tp_group is None or dist.get_world_size(tp_group) == 1:
        return 0
    return dist.get_rank(tp_group) * width


def mask_padded_vocab(output_layer: torch.nn.Module, true_vocab: int, padded_vocab: int):
    """Register the hook on a megatron-core output layer (ColumnParallelLinear); returns its handle."""
    if padded_vocab == true_vocab:
        return None

    def hook(module, args, output):
        logits = output[0]
        columns = padding_columns(true_vocab, logits.shape[-1],
                                  _column_start(logits.shape[-1], padded_vocab, getattr(module, "tp_group", None)))
        if columns is not None:
            logits[..., columns] = float("-inf")
        return output

    return output_layer.register_forward_hook(hook)
