"""Tokenize text documents into a Megatron indexed dataset (.bin/.idx) with megatron-core's own builder.

Inputs: .jsonl / .json lines (a text field), .txt (one document per blank-line-separated paragraph
block, or per line with `per_line`), .parquet (a text column). Tokenization runs in worker processes;
documents are written in input order, so the output does not depend on the number of workers.

A document that cannot be read (invalid JSON, a missing text field, bytes that are not UTF-8) is an
error naming its file and line; with `skip_bad_rows` it is skipped and counted instead.
"""
import contextlib
import json
import multiprocessing
import os
import re
import time
from dataclasses import dataclass, field
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
    skipped: int = 0                                  # bad rows skipped (skip_bad_rows)
    skipped_examples: tuple[str, ...] = ()


@dataclass
class BadRows:
    """Raises at the first bad row, or (skip) counts them and keeps the first few messages."""
    skip: bool = False
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def found(self, message: str) -> None:
        if not self.skip:
            raise ConfigError(message + "; or pass --skip-bad-rows to skip such rows")
        self.count += 1
        if len(self.examples) < 3:
            self.examples.append(message)


# Bytes that are not UTF-8, decoded with errors="surrogateescape", become these code points.
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def _not_utf8(where: str, match: re.Match) -> str:
    return (f"{where}: expected UTF-8 text, found the byte 0x{ord(match.group()) - 0xDC00:02x}, which is not "
            f"UTF-8; re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)")


def read_documents(path: Path, text_key: str, per_line: bool = False, bad: BadRows | None = None) -> Iterator[str]:
    bad = bad or BadRows()
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ConfigError(f"input {path} does not exist")
    if suffix in (".jsonl", ".json"):
        with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is named by its line
            for number, data in enumerate(f, 1):
                line = data.decode("utf-8", errors="surrogateescape")
                if not line.strip():
                    continue
                undecodable = _UNDECODABLE.search(line)
                if undecodable:
                    bad.found(_not_utf8(f"{path}:{number} column {undecodable.start() + 1}", undecodable))
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    column = min(e.pos, len(line.rstrip("\r\n"))) + 1  # json counts the newline as a line
                    bad.found(f"{path}:{number}: invalid JSON ({e.msg} at column {column})")
                    continue
                if not isinstance(row, dict) or not isinstance(row.get(text_key), str):
                    found = sorted(row) if isinstance(row, dict) else type(row).__name__
                    bad.found(f"{path}:{number}: expected a JSON object with a string field {text_key!r}; "
                              f"found {found}")
                    continue
                yield row[text_key]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        if text_key not in table.column_names:
            raise ConfigError(f"{path}: no column {text_key!r}; columns: {table.column_names}")
        yield from table.column(text_key).to_pylist()
    elif suffix == ".txt":
        text = path.read_bytes().decode("utf-8", errors="surrogateescape")
        line = 1  # where the block starts
        for block in (text.splitlines() if per_line else text.split("\n\n")):
            undecodable = _UNDECODABLE.search(block)
            if undecodable:
                bad.found(_not_utf8(f"{path}:{line + block.count(chr(10), 0, undecodable.start())}", undecodable))
            elif block.strip():
                yield block
            line += 1 if per_line else block.count("\n") + 2
    else:
        raise ConfigError(f"input {path}: unsupported extension {suffix!r}; expected .jsonl, .json, .txt or .parquet")


_TOKENIZER = None


def _init_worker(tokenizer_dir: str) -> None:
    global _TOKENIZER  # one tokenizer per worker process, loaded once
    from transformers import AutoTokenizer
    _TOKENIZER = AutoTokenizer.from_pretrained(tokenizer_dir)


def _token_ids(tokenizer, text: str, append_eod: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if append_eod:
        ids.append(tokenizer.eos_token_id)
    return ids


def _tokenize(args: tuple[str, bool]) -> list[int]:
    return _token_ids(_TOKENIZER, *args)


def preprocess(inputs: list[Path], tokenizer_dir: str, output_prefix: str, text_key: str = "text",
               append_eod: bool = True, workers: int = 1, per_line: bool = False,
               progress: bool = True, skip_bad_rows: bool = False) -> PreprocessStats:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if append_eod and tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {tokenizer_dir} has no eos token to append as end-of-document")
    dtype = numpy.uint16 if len(tokenizer) < 65500 else numpy.int32
    out = Path(output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin, tmp_idx = Path(f"{out}.bin.tmp"), Path(f"{out}.idx.tmp")
    try:
        return _write(inputs, tokenizer, tokenizer_dir, out, tmp_bin, tmp_idx, dtype, text_key, append_eod, workers,
                      per_line, progress, BadRows(skip_bad_rows))
    finally:  # on success these were renamed away; on failure no partial file is left behind
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)


def _write(inputs, tokenizer, tokenizer_dir, out, tmp_bin, tmp_idx, dtype, text_key, append_eod, workers, per_line,
           progress, bad: BadRows) -> PreprocessStats:
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
    # With workers, read by the pool's task thread in this process, so `bad` counts here; a ConfigError it
    # raises reaches the loop below (multiprocessing hands an exception of the input iterator to the result).
    documents = (doc for path in inputs for doc in read_documents(Path(path), text_key, per_line, bad))
    started, n_docs, n_tokens = time.perf_counter(), 0, 0
    bar = tqdm(unit="doc", desc="tokenizing", disable=not progress)
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(
                workers, initializer=_init_worker, initargs=(tokenizer_dir,)))
            token_ids = pool.imap(_tokenize, ((d, append_eod) for d in documents), chunksize=64)
        else:  # one worker: tokenize here, without starting (and importing into) a process
            token_ids = (_token_ids(tokenizer, d, append_eod) for d in documents)
        for ids in token_ids:
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
    return PreprocessStats(n_docs, n_tokens, time.perf_counter() - started, bad.count, tuple(bad.examples))
