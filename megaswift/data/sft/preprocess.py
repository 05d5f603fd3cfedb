"""The SFT data pipeline: sources -> standard conversations -> input_ids / labels / loss_scale rows.

    result = preprocess_sft(SFTDataSettings(datasets=["train.jsonl", "more.parquet#5000"]),
                            tokenizer, cache_dir="cache/", num_proc=4)
    result.dataset  # datasets.Dataset: input_ids, labels, loss_scale, length (see template.py)
    result.stats    # rows in/kept/dropped by reason, tokens, samples/s, tokens/s, cache hit

The result is cached under cache_dir by a fingerprint of: the settings, each local data file's
path + size + mtime (each file of a saved `datasets` folder; hub datasets by name only), the
tokenizer's full serialised state and chat template, and the loss-scale config's content.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import jinja2
import numpy as np

from megaswift.data.sft.formats import SampleFormatError, detect_format, location, normalise_row, role_order_warnings
from megaswift.data.sft.loss_scale import LossScaleConfig, load_loss_scale, loss_scale_path
from megaswift.data.sft.sources import DatasetSpec, load_source, mix_sources
from megaswift.data.sft.template import LOSS_ON, OVER_LENGTH, IGNORE_INDEX, SFTTemplate, TemplateError

PIPELINE_VERSION = 2  # bump when the meaning of a cached row changes
DROP_REASONS = ("bad_row", "too_long", "no_trained_tokens")
OUTPUT_FEATURES = datasets.Features({
    "input_ids": datasets.Sequence(datasets.Value("int32")),
    "labels": datasets.Sequence(datasets.Value("int32")),
    "loss_scale": datasets.Sequence(datasets.Value("float32")),
    "length": datasets.Value("int32"),
    "num_trained": datasets.Value("int32"),
    "truncated": datasets.Value("bool"),
    "status": datasets.Value("string"),
    "warning": datasets.Value("string"),  # "file:line: kind; kind" for unusual role orders, else ""
})
EXAMPLES = 3  # bad rows / warnings quoted in the stats


@dataclass(frozen=True)
class SFTDataSettings:
    """Everything that decides the content of the preprocessed rows (and so the cache key)."""
    datasets: tuple[str, ...] = ()
    max_length: int = 2048          # tokens per sample (input_ids length after the shift)
    loss_on: str = "last_round"     # last_round | all_assistant | all
    loss_scale: str = "default"     # built-in name (default, agent) or a JSON config path
    over_length: str = "drop"       # drop | truncate
    skip_bad_rows: bool = False     # skip (and count) malformed rows instead of raising
    seed: int = 42                  # sampling (path#N) and shuffling
    shuffle: bool = True            # shuffle the mix of datasets

    def __post_init__(self):
        object.__setattr__(self, "datasets", tuple(self.datasets))
        if not self.datasets:
            raise ValueError("SFTDataSettings.datasets: expected at least one dataset, found none")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on: expected one of {LOSS_ON}, found {self.loss_on!r}")
        if self.over_length not in OVER_LENGTH:
            raise ValueError(f"over_length: expected one of {OVER_LENGTH}, found {self.over_length!r}")
        if self.max_length < 1:
            raise ValueError(f"max_length: expected >= 1, found {self.max_length}")


@dataclass
class PreprocessedSFT:
    dataset: datasets.Dataset
    stats: dict = field(default_factory=dict)


def _file_state(path: Path) -> list:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def fingerprint(settings: SFTDataSettings, tokenizer) -> str:
    """Hex digest naming the cached result of these settings, data files and tokenizer."""
    h = hashlib.sha256()
    h.update(json.dumps([PIPELINE_VERSION, dataclasses.asdict(settings)], sort_keys=True).encode())
    for text in settings.datasets:
        where = Path(os.path.expanduser(DatasetSpec.parse(text).location))
        h.update(json.dumps(_file_state(where) if where.exists() else ["hub", str(where)]).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.chat_template, tokenizer.all_special_tokens]).encode())
    h.update(loss_scale_path(settings.loss_scale).read_bytes())
    return h.hexdigest()


class _Unreadable(ValueError):
    """A row its reader could not read; the message (the reader's SampleFormatError) names file and line."""


class _RowEncoder:
    """The function `datasets.map` runs: raw rows -> encoded rows with a status (picklable). The rows of a
    batch are read first, then encoded together (SFTTemplate.encode_batch: one tokenizer call per batch);
    errors are raised or counted in row order, as if the rows were encoded one by one."""

    def __init__(self, template: SFTTemplate, skip_bad_rows: bool):
        self.template, self.skip_bad_rows = template, skip_bad_rows

    def __call__(self, batch: dict) -> dict:
        read = []  # per row: (where, sample or None, warning, error or None)
        for raw, origin, line, fmt, error in zip(batch["raw"], batch["origin"], batch["line"], batch["format"],
                                                 batch["error"]):
            where = location(origin, line)
            try:
                if error:  # a row the reader could not read (there only with skip_bad_rows): error names it
                    raise _Unreadable(error)
                sample = normalise_row(json.loads(raw), fmt, where)
            except Exception as err:  # noqa: BLE001 - raised (or counted) below, in row order
                read.append((where, None, "", err))
                continue
            kinds = role_order_warnings(sample["messages"])
            read.append((where, sample, f"{where}: {'; '.join(kinds)}" if kinds else "", None))
        encoded_rows = iter(self.template.encode_batch([sample for _, sample, _, _ in read if sample is not None]))
        out = {name: [] for name in OUTPUT_FEATURES}
        for where, sample, warning, err in read:
            encoded = next(encoded_rows) if sample is not None else None
            if isinstance(encoded, Exception):
                encoded, err = None, self._encode_error(encoded, where)
            if err is not None:
                if not self.skip_bad_rows or not isinstance(err, (SampleFormatError, _Unreadable)):
                    raise err
                status = f"bad_row: {err}"
            else:
                status = encoded.drop_reason
            ids = encoded.input_ids if encoded else []
            labels = encoded.labels if encoded else []
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["loss_scale"].append(encoded.loss_scale if encoded else [])
            out["length"].append(len(ids))
            out["num_trained"].append(len(labels) - labels.count(IGNORE_INDEX))
            out["truncated"].append(bool(encoded and encoded.truncated))
            out["status"].append(status)
            out["warning"].append(warning)
        return out

    @staticmethod
    def _encode_error(err: Exception, where: str) -> Exception:
        """What to raise (or count) for a row the template could not encode."""
        if isinstance(err, TemplateError):
            return err  # the template cannot be used at all: not this row's fault (raised, never skipped)
        if isinstance(err, (ValueError, jinja2.TemplateError)):  # the template refused this conversation
            return SampleFormatError(where, "a conversation the tokenizer's chat template can render",
                                     f"{type(err).__name__}: {err}")
        return err


def load_raw_mixture(settings: SFTDataSettings) -> datasets.Dataset:
    """All datasets of the settings, each with its detected format, sampled and mixed."""
    parts = []
    for index, text in enumerate(settings.datasets):
        part = load_source(text, seed=settings.seed + index, skip_bad_rows=settings.skip_bad_rows)
        if len(part) == 0:
            raise ValueError(f"dataset {text!r}: expected at least one row, found an empty dataset")
        readable = next((i for i, error in enumerate(part["error"]) if not error), None)
        if readable is None:
            raise ValueError(f"dataset {text!r}: expected at least one readable row, found none; the first: "
                             f"{part[0]['error']}")
        first = part[readable]
        fmt = detect_format(json.loads(first["raw"]), location(first["origin"], first["line"]))
        parts.append(part.add_column("format", [fmt] * len(part)))
    return mix_sources(parts, seed=settings.seed, shuffle=settings.shuffle)


def _encode_all(settings: SFTDataSettings, tokenizer, num_proc: int) -> tuple[datasets.Dataset, dict]:
    start = time.perf_counter()
    raw = load_raw_mixture(settings)
    loss_scale: LossScaleConfig = load_loss_scale(settings.loss_scale)
    template = SFTTemplate(tokenizer, settings.loss_on, settings.max_length, settings.over_length, loss_scale)
    encoded = raw.map(_RowEncoder(template, settings.skip_bad_rows), batched=True, batch_size=256,
                      num_proc=num_proc if num_proc > 1 else None, remove_columns=raw.column_names,
                      features=OUTPUT_FEATURES, new_fingerprint=fingerprint(settings, tokenizer)[:40],
                      desc="sft: normalise + tokenize")
    status = np.asarray(encoded["status"], dtype=object)
    kept = np.flatnonzero(status == "")
    seconds = time.perf_counter() - start
    lengths = np.asarray(encoded["length"], dtype=np.int64)
    stats = {
        "rows_in": len(encoded),
        "rows_kept": int(kept.size),
        "dropped": {r: int(sum(1 for s in status if s.startswith(r))) for r in DROP_REASONS},
        "bad_row_examples": [s[len("bad_row: "):] for s in status if s.startswith("bad_row")][:EXAMPLES],
        **_role_order_stats(encoded["warning"]),
        "truncated": int(np.asarray(encoded["truncated"])[kept].sum()),
        "tokens": int(lengths[kept].sum()),
        "trained_tokens": int(np.asarray(encoded["num_trained"], dtype=np.int64)[kept].sum()),
        "seconds": round(seconds, 3),
        "samples_per_s": round(len(encoded) / seconds, 1),
        "tokens_per_s": round(float(lengths.sum()) / seconds, 1),
    }
    if kept.size == 0:
        raise ValueError(f"sft data: expected at least one usable row, found none ({describe_stats(stats)}); "
                         f"{_what_to_do(stats)}")
    dataset = encoded.select(kept.tolist()).remove_columns(["status", "truncated", "warning"]).flatten_indices()
    return dataset, stats


def _what_to_do(stats: dict) -> str:
    advice = []
    if stats["dropped"]["too_long"]:
        advice.append("raise --data.seq_length or pass --data.over_length truncate")
    if stats["dropped"]["bad_row"]:
        advice.append(f"fix the bad rows (e.g. {stats['bad_row_examples'][0]})")
    if stats["dropped"]["no_trained_tokens"]:
        advice.append("check --data.loss_on (rows without a trained assistant turn are dropped)")
    return "; ".join(advice) or "check the data"


def _role_order_stats(warnings: list[str]) -> dict:
    """{"role_order": {kind: rows}, "role_order_examples": ["file:line: kind", ...]}"""
    counts: dict[str, int] = {}
    for warning in warnings:
        for kind in warning.rpartition(": ")[2].split("; ") if warning else ():
            counts[kind] = counts.get(kind, 0) + 1
    return {"role_order": counts, "role_order_examples": [w for w in warnings if w][:EXAMPLES]}


def preprocess_sft(settings: SFTDataSettings, tokenizer, cache_dir: str | Path | None = None,
                   num_proc: int = 1, report: bool = True) -> PreprocessedSFT:
    """Run (or load from cache) the pipeline; see the module docstring."""
    key = fingerprint(settings, tokenizer)[:20]
    target = Path(cache_dir) / f"sft-{key}" if cache_dir is not None else None
    if target is not None and (target / "stats.json").exists():
        stats = json.loads((target / "stats.json").read_text())
        result = PreprocessedSFT(datasets.load_from_disk(str(target / "dataset")), {**stats, "cache_hit": True})
    else:
        dataset, stats = _encode_all(settings, tokenizer, num_proc)
        stats["fingerprint"] = key
        if target is not None:
            partial = target.with_name(target.name + f".tmp-{os.getpid()}")
            shutil.rmtree(partial, ignore_errors=True)
            dataset.save_to_disk(str(partial / "dataset"))
            (partial / "stats.json").write_text(json.dumps(stats, indent=1))  # written last: marks completion
            if target.exists():  # another process finished the same work first
                shutil.rmtree(partial)
            else:
                os.replace(partial, target)
            dataset = datasets.load_from_disk(str(target / "dataset"))
        result = PreprocessedSFT(dataset, {**stats, "cache_hit": False})
    if report:
        print(describe_stats(result.stats), file=sys.stderr)
        warning = describe_role_order(result.stats)
        if warning:
            print(warning, file=sys.stderr)
    return result


def describe_role_order(stats: dict) -> str:
    """A warning line about unusual role orders, or "" when there were none."""
    counts = stats.get("role_order") or {}
    if not counts:
        return ""
    kinds = ", ".join(f"{kind}: {n}" for kind, n in counts.items())
    return (f"sft data: warning: rows with an unusual role order were kept ({kinds}); e.g. "
            f"{'; '.join(stats['role_order_examples'])}")


def describe_stats(stats: dict) -> str:
    dropped = ", ".join(f"{k} {v}" for k, v in stats["dropped"].items() if v) or "none"
    source = "cache" if stats.get("cache_hit") else f"{stats['seconds']} s"
    return (f"sft data: {stats['rows_kept']}/{stats['rows_in']} rows kept (dropped: {dropped}; truncated "
            f"{stats['truncated']}), {stats['tokens']} tokens ({stats['trained_tokens']} trained); {source}, "
            f"{stats['samples_per_s']} samples/s, {stats['tokens_per_s']} tokens/s")
