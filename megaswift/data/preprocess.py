"""Tokenize text documents into a Megatron indexed dataset (.bin/.idx) with megatron-core's own builder.

Inputs: .jsonl / .json lines (a text field), .txt (one document per blank-line-separated paragraph
block, or per line with `per_line`), .parquet (a text column). Tokenization runs in worker processes;
documents are written in input order, so the output does not depend on the number of workers.
"""
import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tqdm import tqdm

from megaswift.config import ConfigError


@dataclass(frozen=True)
class PreprocessStats:
    documents: int
    tokens: int
    seconds: float


def read_documents(path: Path, text_key: str, per_line: bool = False) -> Iterator[str]:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ConfigError(f"input {path} does not exist")
    if suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{number}: invalid JSON ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get(text_key), str):
                    found = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise ConfigError(f"{path}:{number}: expected a JSON object with a string field "
                                      f"{text_key!r}; found {found}")
                yield row[text_key]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        if text_key not in table.column_names:
            raise ConfigError(f"{path}: no column {text_key!r}; columns: {table.column_names}")
        yield from table.column(text_key).to_pylist()
    elif suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        blocks = text.splitlines() if per_line else text.split("\n\n")
        yield from (b for b in blocks if b.strip())
    else:
        raise ConfigError(f"input {path}: unsupported extension {suffix!r}; expected .jsonl, .json, .txt or .parquet")


_TOKENIZER = None


def _init_worker(tokenizer_dir: str) -> None:
    global _TOKENIZER  # one tokenizer per worker process, loaded once
    from transformers import AutoTokenizer
    _TOKENIZER = AutoTokenizer.from_pretrained(tokenizer_dir)


def _tokenize(args: tuple[str, bool]) -> list[int]:
    text, append_eod = args
    ids = _TOKENIZER(text, add_special_tokens=False)["input_ids"]
    if append_eod:
        ids.append(_TOKENIZER.eos_token_id)
    return ids


def preprocess(inputs: list[Path], tokenizer_dir: str, output_prefix: str, text_key: str = "text",
               append_eod: bool = True, workers: int = 1, per_line: bool = False,
               progress: bool = True) -> PreprocessStats:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if append_eod and tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {tokenizer_dir} has no eos token to append as end-of-document")
    dtype = numpy.uint16 if len(tokenizer) < 65500 else numpy.int32
    out = Path(output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin, tmp_idx = Path(f"{out}.bin.tmp"), Path(f"{out}.idx.tmp")
    try:
        return _write(inputs, tokenizer_dir, out, tmp_bin, tmp_idx, dtype, text_key, append_eod, workers, per_line,
                      progress)
    finally:  # on success these were renamed away; on failure no partial file is left behind
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)


def _write(inputs, tokenizer_dir, out, tmp_bin, tmp_idx, dtype, text_key, append_eod, workers, per_line,
           progress) -> PreprocessStats:
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
    documents = (doc for path in inputs for doc in read_documents(Path(path), text_key, per_line))
    started, n_docs, n_tokens = time.perf_counter(), 0, 0
    bar = tqdm(unit="doc", desc="tokenizing", disable=not progress)
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_dir,)) as pool:
        for ids in pool.imap(_tokenize, ((d, append_eod) for d in documents), chunksize=64):
            if not ids:
                continue
            builder.add_item(torch.tensor(ids, dtype=torch.int64))
            builder.end_document()
            n_docs += 1
            n_tokens += len(ids)
            bar.update(1)
            bar.set_postfix(tokens_per_s=f"{n_tokens / max(time.perf_counter() - started, 1e-9):.0f}")
    bar.close()
    if n_docs == 0:
        raise ConfigError(f"no documents found in {[str(p) for p in inputs]}")
    builder.finalize(str(tmp_idx))
    os.replace(tmp_bin, f"{out}.bin")
    os.replace(tmp_idx, f"{out}.idx")
    return PreprocessStats(n_docs, n_tokens, time.perf_counter() - started)
