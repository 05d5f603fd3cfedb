"""Load raw rows from local files, saved `datasets` folders or the hub; sample and mix them.

Every loader returns a `datasets.Dataset` with three columns, so that later stages can name the
file and line of a bad row whatever the source was:
    raw     the row as JSON text (kept as text: Arrow would merge the keys of differently shaped
            tool-call arguments into one struct and fill them with nulls)
    origin  the file, folder or hub name it came from
    line    1-based line in a text file (jsonl, json, csv), else 1-based row number

A dataset spec is `location` or `location#N`: N rows sampled without replacement, repeating the
whole dataset when N is larger, deterministic for a given seed.
"""
from __future__ import annotations

import csv
import json
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import datasets
import numpy as np

from megaswift.data.sft.formats import SampleFormatError, location


@dataclass(frozen=True)
class DatasetSpec:
    location: str
    num_samples: int | None = None

    @classmethod
    def parse(cls, text: str) -> "DatasetSpec":
        base, sep, count = text.rpartition("#")
        if sep and count.isdigit() and not Path(text).exists():
            if int(count) < 1:
                raise ValueError(f"dataset spec {text!r}: expected a sample count >= 1 after '#', found {count}")
            return cls(base, int(count))
        return cls(text)


def _rows_table(rows: list, lines: list[int], origin: str) -> datasets.Dataset:
    return datasets.Dataset.from_dict({
        "raw": [json.dumps(r, ensure_ascii=False) for r in rows],
        "origin": [origin] * len(rows),
        "line": lines,
    })


def _read_jsonl(path: Path) -> datasets.Dataset:
    rows, lines = [], []
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                rows.append(json.loads(text))
            except json.JSONDecodeError as err:
                raise SampleFormatError(location(str(path), number), "one JSON object per line",
                                        f"invalid JSON ({err.msg} at column {err.colno})") from None
            lines.append(number)
    return _rows_table(rows, lines, str(path))


_WHITESPACE = re.compile(r"\s*")


def _read_json(path: Path) -> datasets.Dataset:
    """A JSON array of rows; each row is reported by the line where it starts."""
    text = path.read_text(encoding="utf-8")
    pos = _WHITESPACE.match(text).end()
    if text[pos:pos + 1] != "[":
        if text[pos:pos + 1] == "{" and "\n{" in text.strip():
            return _read_jsonl(path)  # JSON lines saved with a .json name
        raise SampleFormatError(location(str(path), 1 + text.count("\n", 0, pos)),
                                "a JSON array of rows (or JSON lines)", repr(text[pos:pos + 20]))
    decoder = json.JSONDecoder()
    rows, starts = [], []
    pos = _WHITESPACE.match(text, pos + 1).end()
    while text[pos:pos + 1] != "]":
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise SampleFormatError(location(str(path), err.lineno), "a JSON array of rows",
                                    f"invalid JSON ({err.msg} at column {err.colno})") from None
        rows.append(row)
        starts.append(pos)
        pos = _WHITESPACE.match(text, end).end()
        if text[pos:pos + 1] == ",":
            pos = _WHITESPACE.match(text, pos + 1).end()
        elif text[pos:pos + 1] != "]":
            raise SampleFormatError(location(str(path), 1 + text.count("\n", 0, pos)),
                                    "',' or ']' between rows", repr(text[pos:pos + 20]))
    # character offsets -> 1-based line numbers, in one pass over the text
    newline_offsets = np.flatnonzero(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32) == ord("\n"))
    lines = (np.searchsorted(newline_offsets, starts) + 1).tolist()
    return _rows_table(rows, lines, str(path))


def _read_csv(path: Path) -> datasets.Dataset:
    rows, lines = [], []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        reader.fieldnames  # reads the header, so line_num counts it
        start = reader.line_num + 1
        for row in reader:
            # empty cells mean "absent" (CSV cannot tell the two apart)
            rows.append({k: v for k, v in row.items() if k is not None and v != ""})
            lines.append(start)
            start = reader.line_num + 1
    return _rows_table(rows, lines, str(path))


def _read_parquet(path: Path) -> datasets.Dataset:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return _rows_table(rows, list(range(1, len(rows) + 1)), str(path))


def _from_hf_dataset(ds, origin: str) -> datasets.Dataset:
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{origin}: expected a Dataset or a DatasetDict with a 'train' split, "
                             f"found splits {list(ds)}")
        ds = ds["train"]

    def to_raw(batch, indices):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        return {"raw": [json.dumps(r, ensure_ascii=False, default=str) for r in rows],
                "origin": [origin] * len(rows), "line": [i + 1 for i in indices]}

    return ds.map(to_raw, batched=True, with_indices=True, remove_columns=ds.column_names,
                  desc=f"reading {origin}")


def _hub_unreachable_reason() -> str | None:
    """Why the hub cannot be used right now, found in at most a few seconds (datasets itself retries
    for about 30 s before giving up)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    outcome: list[str | None] = []

    def probe():  # in a thread: a DNS lookup ignores socket timeouts
        try:
            socket.create_connection((host, 443), timeout=3).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"cannot connect to {host}: {err}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout=4)
    return outcome[0] if outcome else f"no answer from {host} within 4 s"


def _load_hub(name: str) -> datasets.Dataset:
    expected = ("expected a local jsonl/json/csv/parquet file, a folder saved with `datasets.save_to_disk`, "
                "or a hub dataset name")
    reason = _hub_unreachable_reason()
    if reason is not None:
        raise FileNotFoundError(f"dataset {name!r}: {expected}; it is no local path and the hub is not "
                                f"reachable ({reason}). Download it where there is network, or pass a local path.")
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as err:  # noqa: BLE001 - every failure here means the same thing to the user
        raise FileNotFoundError(f"dataset {name!r}: {expected}; it is no local path and loading it from the "
                                f"hub failed (name misspelt? gated?): {type(err).__name__}: {err}") from None
    return _from_hf_dataset(ds, name)


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def read_rows(where: str) -> datasets.Dataset:
    """All rows of one dataset location, in order."""
    path = Path(os.path.expanduser(where))
    if path.is_dir():
        if not any((path / marker).exists() for marker in ("dataset_info.json", "dataset_dict.json", "state.json")):
            raise ValueError(f"{path}: expected a folder written by datasets' save_to_disk "
                             f"(with state.json or dataset_dict.json), found a folder without one")
        return _from_hf_dataset(datasets.load_from_disk(str(path)), str(path))
    if path.is_file():
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise ValueError(f"{path}: expected one of the extensions {sorted(READERS)}, found {path.suffix!r}")
        return reader(path)
    looks_local = where.startswith((".", "/", "~")) or Path(where).suffix.lower() in READERS
    if looks_local:
        raise FileNotFoundError(f"dataset {where!r}: no such file or folder")
    return _load_hub(where)


def sample_rows(ds: datasets.Dataset, num_samples: int | None, seed: int) -> datasets.Dataset:
    """`num_samples` rows: a seeded subset, or whole copies plus a seeded subset when more are asked."""
    if num_samples is None or len(ds) == 0:
        return ds
    rng = np.random.default_rng(seed)
    copies, rest = divmod(num_samples, len(ds))
    indices = np.concatenate([np.tile(np.arange(len(ds)), copies),
                              np.sort(rng.permutation(len(ds))[:rest])])
    return ds.select(indices.tolist())


def load_source(spec: str | DatasetSpec, seed: int = 0) -> datasets.Dataset:
    """One dataset spec (`path`, `path#N`, hub name) -> raw/origin/line rows."""
    spec = DatasetSpec.parse(spec) if isinstance(spec, str) else spec
    return sample_rows(read_rows(spec.location), spec.num_samples, seed)


def mix_sources(parts: list[datasets.Dataset], seed: int = 0, shuffle: bool = True) -> datasets.Dataset:
    """Concatenate datasets (same columns) and shuffle them together, deterministically."""
    mixed = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return mixed.shuffle(seed=seed).flatten_indices() if shuffle else mixed
