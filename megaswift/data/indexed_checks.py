"""Checks of Megatron indexed datasets (.bin/.idx) that run before any model is built, so that a bad
setting is one clear error instead of a hang or a crash at step 1.

- Split sizes: megatron-core splits each dataset's documents by `data.split` and, for a part that
  holds no tokens, loops forever in GPTDataset._get_num_epochs (it keeps adding empty epochs until
  it has the tokens asked for). Every non-zero part must hold at least one sample (seq_length + 1
  tokens) in every dataset; the error gives documents and tokens per part and dataset, and a split
  that works.
- Token ids: an id at or past the model's vocabulary size fails at step 1 inside the embedding
  ("index out of range in self"); the largest id of each .bin is read in chunks through a memory map
  (megatron's .idx has no such field; ~1.3e9 tokens/s from the page cache on one core) and compared
  with the model's true (unpadded) vocabulary. A file whose dtype cannot hold such an id is not read;
  the result is cached per file (path, size, mtime), so a resumed run does not read the data again.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.indexed_dataset import _IndexReader  # reads .idx only (IndexedDataset maps .bin too)

from megaswift.config import ConfigError

SPLIT_NAMES = ("train", "valid", "test")
SCAN_CHUNK = 1 << 26  # token ids per read of the .bin (128 MiB of uint16)
DEFAULT_CACHE = Path.home() / ".cache" / "megaswift" / "max_token_id"


@dataclass(frozen=True)
class SplitPart:
    """What megatron-core gives one part (train/valid/test) of one dataset."""
    documents: int
    tokens: int

    def describe(self) -> str:
        return f"{self.documents} document{'s' * (self.documents != 1)} / {self.tokens} tokens"


def read_index(prefix: str) -> tuple[numpy.ndarray, type]:
    """(tokens per sequence, token dtype) of PREFIX.idx. The lengths are copied: the reader's arrays
    view a memory map that closes with the reader."""
    reader = _IndexReader(prefix + ".idx", multimodal=False)
    return numpy.array(reader.sequence_lengths, dtype=numpy.int64), reader.dtype


def split_parts(sequence_lengths: numpy.ndarray, split: str) -> list[SplitPart | None]:
    """Per part, its documents and tokens exactly as megatron-core's builder cuts them (by sequence,
    bookends rounded); None for a part of weight 0, which megatron-core does not build."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    count, parts = len(sequence_lengths), []
    for bookends in matrix:
        if bookends is None:
            parts.append(None)
            continue
        begin, end = (int(round(b * float(count))) for b in bookends)
        parts.append(SplitPart(end - begin, int(sequence_lengths[begin:end].sum(dtype=numpy.int64))))
    return parts


def check_split_sizes(prefixes: list[str], split: str, seq_length: int, valid_used: bool) -> None:
    """ConfigError naming each too-small part, unless every non-zero part of every dataset holds at least
    one sample of seq_length + 1 tokens."""
    needed = seq_length + 1
    lengths = {prefix: read_index(prefix)[0] for prefix in prefixes}
    table = {prefix: split_parts(seqs, split) for prefix, seqs in lengths.items()}
    small = [(prefix, SPLIT_NAMES[i]) for prefix, parts in table.items() for i, part in enumerate(parts)
             if part is not None and part.tokens < needed]
    if not small:
        return
    lines = [f"  {prefix}: " + ", ".join(f"{name} {part.describe() if part else 'not used (0)'}"
                                          for name, part in zip(SPLIT_NAMES, parts))
             for prefix, parts in table.items()]
    names = ", ".join(f"{name} of {prefix}" for prefix, name in small)
    raise ConfigError(
        f"data.split {split}: too little data in {names}: each non-zero part needs at least one sample of "
        f"seq_length + 1 = {needed} tokens in every dataset (megatron-core would loop forever or fail on an "
        f"empty part). Documents and tokens per part:\n" + "\n".join(lines) + "\n" +
        _suggest_split(lengths, needed, valid_used))


def _suggest_split(lengths: dict, needed: int, valid_used: bool) -> str:
    if not valid_used:
        return "Set --data.split 100,0,0 (evaluation is off: train.eval_interval is 0, so nothing reads valid/test)."
    for valid in range(1, 51):
        split = f"{100 - valid},{valid},0"
        if all(part is None or part.tokens >= needed
               for seqs in lengths.values() for part in split_parts(seqs, split)):
            return f"Set e.g. --data.split {split} (the smallest whole-percent validation part that fits)."
    return ("Even half of the data is less than one validation sample: add data, lower data.seq_length, "
            "or turn evaluation off (--train.eval_interval 0 --data.split 100,0,0).")


def max_token_id(prefix: str) -> int:
    """The largest token id in PREFIX.bin, read in chunks through a memory map."""
    dtype = read_index(prefix)[1]
    tokens = numpy.memmap(prefix + ".bin", dtype=dtype, mode="r")
    largest = -1
    for start in range(0, len(tokens), SCAN_CHUNK):
        largest = max(largest, int(tokens[start:start + SCAN_CHUNK].max()))
    return largest


def cached_max_token_id(prefix: str, cache_dir: Path) -> int:
    """max_token_id, remembered in cache_dir under the file's path, size and mtime."""
    stat = os.stat(prefix + ".bin")
    key = hashlib.sha256(json.dumps([os.path.abspath(prefix), stat.st_size, stat.st_mtime_ns]).encode()).hexdigest()
    entry = Path(cache_dir) / f"{key[:32]}.json"
    try:
        return int(json.loads(entry.read_text())["max_token_id"])
    except (OSError, ValueError, KeyError):
        pass
    largest = max_token_id(prefix)
    try:  # a cache that cannot be written only costs the next run a read of the data
        entry.parent.mkdir(parents=True, exist_ok=True)
        partial = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
        partial.write_text(json.dumps({"bin": os.path.abspath(prefix) + ".bin", "max_token_id": largest}))
        os.replace(partial, entry)
    except OSError:
        pass
    return largest


def check_token_ids(prefixes: list[str], model_vocab_size: int, cache_dir: str | Path | None = None) -> None:
    """ConfigError naming the file, its largest id and the model's vocabulary when an id is out of range."""
    for prefix in prefixes:
        if numpy.iinfo(read_index(prefix)[1]).max < model_vocab_size:
            continue  # the file's dtype cannot hold an id that large
        largest = cached_max_token_id(prefix, Path(cache_dir) if cache_dir else DEFAULT_CACHE)
        if largest >= model_vocab_size:
            raise ConfigError(
                f"data.paths: {prefix}.bin holds token id {largest}, but the model's vocabulary has "
                f"{model_vocab_size} ids (0..{model_vocab_size - 1}); training would fail at step 1. The data "
                f"was tokenized with a larger tokenizer than the model's: preprocess it with the model's "
                f"tokenizer, or use a model with vocab_size > {largest}.")
