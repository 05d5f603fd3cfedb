"""Micro-batches per data-parallel rank, and the iterator methods every data source shares.

Sample order depends only on the samples already consumed, never on the parallel layout: step s trains on
samples [s*G, (s+1)*G) (G = global batch), and data-parallel rank r takes the r-th micro-batch slice of each
group of `micro x dp`. That is what makes resumed and re-laid-out runs reproduce the same losses.
"""
from collections.abc import Callable

import torch


def stack_rows(samples: list[dict]) -> dict[str, torch.Tensor]:
    """[micro, ...] tensors, one per key of the rows (a None attention mask is left out)."""
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]
            if key != "attention_mask" or samples[0][key] is not None}


class MicroBatches:
    """Yields this rank's micro-batches for consecutive global batches starting at `consumed_samples`.

    Every pipeline stage (and virtual stage) holds its own MicroBatches over the same dataset, so each
    builds the same micro-batch, metadata such as PackedSeqParams included, with no broadcast."""

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int = 0,
                 collate: Callable[[list[dict]], dict] = stack_rows):
        self.dataset, self.micro, self.dp_rank, self.dp_size = dataset, micro_batch_size, dp_rank, dp_size
        self.next_index, self.collate = consumed_samples, collate

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.next_index + self.dp_rank * self.micro
        self.next_index += self.micro * self.dp_size
        return self.collate([self.dataset[(start + i) % len(self.dataset)] for i in range(self.micro)])


class SplitIterators:
    """`train_iterators` / `valid_iterators` over the (train, valid) datasets that `_splits()` builds once."""
    micro: int

    def _splits(self) -> tuple:
        raise NotImplementedError

    def collate(self, samples: list[dict]) -> dict:
        return stack_rows(samples)

    def train_iterators(self, consumed_samples: int, dp_rank: int, dp_size: int, count: int) -> list:
        train = self._splits()[0]
        # One iterator per virtual-pipeline chunk: the first chunk reads tokens, the last one labels.
        return [MicroBatches(train, self.micro, dp_rank, dp_size, consumed_samples, self.collate)
                for _ in range(count)]

    def valid_iterators(self, dp_rank: int, dp_size: int, count: int) -> list | None:
        valid = self._splits()[1]
        if valid is None or len(valid) == 0:
            return None
        return [MicroBatches(valid, self.micro, dp_rank, dp_size, 0, self.collate) for _ in range(count)]
