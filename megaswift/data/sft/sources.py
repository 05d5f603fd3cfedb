"""Load raw rows from local files, saved `datasets` folders or the hub; sample and mix them.

Every loader returns a `datasets.Dataset` with four columns, so that later stages can name the
file and line of a bad row whatever the source was:
    raw     the row as JSON text (kept as text: Arrow would merge the keys of differently shaped
            tool-call arguments into one struct and fill them with nulls)
    origin  the file, folder or hub name it came from
    line    1-based line in a text file (jsonl, json, csv), else 1-based row number
    error   "" for a readable row; for a row that cannot be read (invalid JSON, bytes that are not
            UTF-8) the error naming file and line. Such rows exist only with `skip_bad_rows`; without
            it the reader raises at the first one (SampleFormatError).

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


def _rows_table(rows: list, lines: list[int], origin: str, errors: list[str] | None = None) -> datasets.Dataset:
    return datasets.Dataset.from_dict({
        "raw": [json.dumps(r, ensure_ascii=False) for r in rows],
        "origin": [origin] * len(rows),
        "line": lines,
        "error": errors if errors is not None else [""] * len(rows),
    })


class _BadRows:
    """Rows a reader could not read: raised at once, or (skip_bad_rows) kept as rows with an error."""

    def __init__(self, skip: bool):
        self.skip = skip

    def handle(self, err: SampleFormatError, rows: list, lines: list[int], errors: list[str], line: int) -> None:
        if not self.skip:
            raise err
        rows.append(None)
        lines.append(line)
        errors.append(str(err))


# Bytes that are not UTF-8, decoded with errors="surrogateescape", become these code points.
_UNDECODABLE = re.compile("[\udc80-\udcff]")
_FIX_ENCODING = ("re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or pass --data.skip_bad_rows "
                 "to skip such rows")


def _not_utf8(where: str, match: re.Match, column: int | str | None) -> SampleFormatError:
    byte = ord(match.group()) - 0xDC00
    at = f" at column {column}" if isinstance(column, int) else f" in column {column!r}" if column else ""
    return SampleFormatError(where, "UTF-8 text", f"the byte 0x{byte:02x}{at}, which is not UTF-8; {_FIX_ENCODING}")


def _json_error(err: json.JSONDecodeError, text: str) -> str:
    """Where in one line of JSON the parser stopped, as a column of that line (json's own line/column
    counts the line's trailing newline, so a row cut short reads as 'line 2 column 1')."""
    line = text.rstrip("\r\n")
    if err.pos >= len(line):
        return f"invalid JSON ({err.msg} at the end of the line, column {len(line) + 1}: is the row cut short?)"
    near = line[max(0, err.pos - 15):err.pos + 15]
    return f"invalid JSON ({err.msg} at column {err.pos + 1}, near {near!r})"


def _read_jsonl(path: Path, skip_bad_rows: bool = False) -> datasets.Dataset:
    rows, lines, errors, bad = [], [], [], _BadRows(skip_bad_rows)
    with path.open("rb") as f:  # bytes: a line that is not UTF-8 is named by its line, not the whole file
        for number, data in enumerate(f, start=1):
            text = data.decode("utf-8", errors="surrogateescape")
            if not text.strip():
                continue
            where = location(str(path), number)
            undecodable = _UNDECODABLE.search(text)
            if undecodable:
                bad.handle(_not_utf8(where, undecodable, undecodable.start() + 1), rows, lines, errors, number)
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                bad.handle(SampleFormatError(where, "one JSON object per line", _json_error(err, text)),
                           rows, lines, errors, number)
                continue
            rows.append(row)
            lines.append(number)
            errors.append("")
    return _rows_table(rows, lines, str(path), errors)


_WHITESPACE = re.compile(r"\s*")


def _line_and_column(text: str, pos: int) -> tuple[int, int]:
    line_start = text.rfind("\n", 0, pos) + 1
    return 1 + text.count("\n", 0, pos), pos - line_start + 1


def _read_json(path: Path, skip_bad_rows: bool = False) -> datasets.Dataset:
    """A JSON array of rows; each row is reported by the line where it starts."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    undecodable = _UNDECODABLE.search(text)
    if undecodable and not skip_bad_rows:
        line, column = _line_and_column(text, undecodable.start())
        raise _not_utf8(location(str(path), line), undecodable, column)
    pos = _WHITESPACE.match(text).end()
    if text[pos:pos + 1] != "[":
        if text[pos:pos + 1] == "{" and "\n{" in text.strip():
            return _read_jsonl(path, skip_bad_rows)  # JSON lines saved with a .json name
        raise SampleFormatError(location(str(path), 1 + text.count("\n", 0, pos)),
                                "a JSON array of rows (or JSON lines)", repr(text[pos:pos + 20]))
    decoder = json.JSONDecoder()
    rows, starts, errors = [], [], []
    pos = _WHITESPACE.match(text, pos + 1).end()
    while text[pos:pos + 1] != "]":
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:  # inside one array the next row cannot be found: never skipped
            raise SampleFormatError(location(str(path), err.lineno), "a JSON array of rows",
                                    f"invalid JSON ({err.msg} at column {err.colno})") from None
        undecodable = _UNDECODABLE.search(text, pos, end)
        if undecodable:  # only with skip_bad_rows (checked above)
            line, column = _line_and_column(text, undecodable.start())
            row, error = None, str(_not_utf8(location(str(path), line), undecodable, column))
        else:
            error = ""
        rows.append(row)
        starts.append(pos)
        errors.append(error)
        pos = _WHITESPACE.match(text, end).end()
        if text[pos:pos + 1] == ",":
            pos = _WHITESPACE.match(text, pos + 1).end()
        elif text[pos:pos + 1] != "]":
            raise SampleFormatError(location(str(path), 1 + text.count("\n", 0, pos)),
                                    "',' or ']' between rows", repr(text[pos:pos + 20]))
    # character offsets -> 1-based line numbers, in one pass over the text
    newline_offsets = np.flatnonzero(np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"),
                                                   dtype=np.uint32) == ord("\n"))
    lines = (np.searchsorted(newline_offsets, starts) + 1).tolist()
    return _rows_table(rows, lines, str(path), errors)


def _read_csv(path: Path, skip_bad_rows: bool = False) -> datasets.Dataset:
    rows, lines, errors, bad = [], [], [], _BadRows(skip_bad_rows)
    with path.open(encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        reader.fieldnames  # reads the header, so line_num counts it
        start = reader.line_num + 1
        for row in reader:
            undecodable = next(((k, m) for k, v in row.items() if isinstance(v, str)
                                for m in [_UNDECODABLE.search(v)] if m), None)
            if undecodable:
                column, match = undecodable
                bad.handle(_not_utf8(location(str(path), start), match, column), rows, lines, errors, start)
            else:
                # empty cells mean "absent" (CSV cannot tell the two apart)
                rows.append({k: v for k, v in row.items() if k is not None and v != ""})
                lines.append(start)
                errors.append("")
            start = reader.line_num + 1
    return _rows_table(rows, lines, str(path), errors)


def _read_parquet(path: Path, skip_bad_rows: bool = False) -> datasets.Dataset:  # Arrow strings are UTF-8
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
                "origin": [origin] * len(rows), "line": [i + 1 for i in indices], "error": [""] * len(rows)}

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


def read_rows(where: str, skip_bad_rows: bool = False) -> datasets.Dataset:
    """All rows of one dataset location, in order; unreadable rows raise, or are kept with their error."""
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
        return reader(path, skip_bad_rows)
    if looks_local(where):
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


def load_source(spec: str | DatasetSpec, seed: int = 0, skip_bad_rows: bool = False) -> datasets.Dataset:
    """One dataset spec (`path`, `path#N`, hub name) -> raw/origin/line/error rows."""
    spec = DatasetSpec.parse(spec) if isinstance(spec, str) else spec
    return sample_rows(read_rows(spec.location, skip_bad_rows), spec.num_samples, seed)


def looks_local(where: str) -> bool:
    """Whether a dataset location that does not exist was meant as a local path (not a hub name)."""
    return where.startswith((".", "/", "~")) or Path(where).suffix.lower() in READERS


def mix_sources(parts: list[datasets.Dataset], seed: int = 0, shuffle: bool = True) -> datasets.Dataset:
    """Concatenate datasets (same columns) and shuffle them together, deterministically."""
    mixed = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return mixed.shuffle(seed=seed).flatten_indices() if shuffle else mixed
