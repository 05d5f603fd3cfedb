"""The preference data pipeline: sources -> standard pairs -> encoded chosen / rejected sequences.

    result = preprocess_pairs(SFTDataSettings(datasets=["prefs.jsonl"], max_length=2048), tokenizer)
    result.dataset  # chosen_input_ids / _labels / _loss_scale, rejected_*, prompt_tokens, length
    result.stats    # rows in/kept, dropped by reason (bad_row, too_long, no_trained_tokens), truncated

Settings are sft's (`SFTDataSettings`: datasets, max_length = tokens per PAIR, loss_on, loss_scale,
over_length, skip_bad_rows, seed, shuffle); the sources are sft's readers (`load_source`,
`mix_sources`), so file/line naming and `path#N` sampling are the same. Not cached yet (sft's
fingerprint cache can be reused once the trainer consumes this).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import datasets
import jinja2
import numpy as np

from megaswift.data.rlhf.formats import detect_pair_format, normalise_pair
from megaswift.data.rlhf.template import EncodedPair, PairTemplate
from megaswift.data.sft.formats import SampleFormatError, location
from megaswift.data.sft.loss_scale import load_loss_scale
from megaswift.data.sft.preprocess import SFTDataSettings
from megaswift.data.sft.sources import load_source, mix_sources
from megaswift.data.sft.template import SFTTemplate, TemplateError

DROP_REASONS = ("bad_row", "too_long", "no_trained_tokens")
SEQUENCE_COLUMNS = {"input_ids": "int32", "labels": "int32", "loss_scale": "float32"}
OUTPUT_FEATURES = datasets.Features({
    **{f"{side}_{name}": datasets.Sequence(datasets.Value(dtype))
       for side in ("chosen", "rejected") for name, dtype in SEQUENCE_COLUMNS.items()},
    "prompt_tokens": datasets.Value("int32"),
    "length": datasets.Value("int32"),
    "truncated": datasets.Value("bool"),
    "status": datasets.Value("string"),
})


@dataclass
class PreprocessedPairs:
    dataset: datasets.Dataset
    stats: dict = field(default_factory=dict)


class _PairEncoder:
    """The function `datasets.map` runs: raw rows -> encoded pairs with a status (picklable)."""

    def __init__(self, template: PairTemplate, skip_bad_rows: bool):
        self.template, self.skip_bad_rows = template, skip_bad_rows

    def __call__(self, batch: dict) -> dict:
        out = {name: [] for name in OUTPUT_FEATURES}
        for raw, origin, line, fmt, error in zip(batch["raw"], batch["origin"], batch["line"], batch["format"],
                                                 batch["error"]):
            where = location(origin, line)
            try:
                if error:  # unreadable (present only with skip_bad_rows); the reader's message names it
                    raise SampleFormatError(where, "a readable row", error)
                encoded, status = self._encode(normalise_pair(json.loads(raw), fmt, where), where), None
                status = encoded.drop_reason
            except SampleFormatError as err:
                if not self.skip_bad_rows:
                    raise
                encoded, status = None, f"bad_row: {err}"
            kept = encoded is not None and not status
            for side in ("chosen", "rejected"):
                sample = getattr(encoded, side) if kept else None
                for name in SEQUENCE_COLUMNS:
                    out[f"{side}_{name}"].append(getattr(sample, name) if sample else [])
            out["prompt_tokens"].append(encoded.prompt_tokens if kept else 0)
            out["length"].append(encoded.length if kept else 0)
            out["truncated"].append(bool(kept and encoded.truncated))
            out["status"].append(status)
        return out

    def _encode(self, pair: dict, where: str) -> EncodedPair:
        try:
            return self.template.encode(pair)
        except TemplateError:
            raise  # the template cannot be used at all: not this row's fault
        except (ValueError, jinja2.TemplateError) as err:
            raise SampleFormatError(where, "a conversation the tokenizer's chat template can render",
                                    f"{type(err).__name__}: {err}") from None


def load_pair_mixture(settings: SFTDataSettings) -> datasets.Dataset:
    """All datasets, each with the pair format detected from its first readable row, sampled and mixed."""
    parts = []
    for index, text in enumerate(settings.datasets):
        part = load_source(text, seed=settings.seed + index, skip_bad_rows=settings.skip_bad_rows)
        readable = next((i for i, error in enumerate(part["error"]) if not error), None)
        if readable is None:
            raise ValueError(f"dataset {text!r}: expected at least one readable row, found none")
        first = part[readable]
        fmt = detect_pair_format(json.loads(first["raw"]), location(first["origin"], first["line"]))
        parts.append(part.add_column("format", [fmt] * len(part)))
    return mix_sources(parts, seed=settings.seed, shuffle=settings.shuffle)


def preprocess_pairs(settings: SFTDataSettings, tokenizer, num_proc: int = 1) -> PreprocessedPairs:
    """Normalise and encode every pair (see the module docstring); kept rows only, with stats."""
    start = time.perf_counter()
    raw = load_pair_mixture(settings)
    template = PairTemplate(SFTTemplate(tokenizer, settings.loss_on, settings.max_length, settings.over_length,
                                        load_loss_scale(settings.loss_scale)))
    encoded = raw.map(_PairEncoder(template, settings.skip_bad_rows), batched=True, batch_size=256,
                      num_proc=num_proc if num_proc > 1 else None, remove_columns=raw.column_names,
                      features=OUTPUT_FEATURES, desc="rlhf: normalise + tokenize pairs")
    status = np.asarray(encoded["status"], dtype=object)
    kept = np.flatnonzero(status == "")
    stats = {
        "rows_in": len(encoded),
        "rows_kept": int(kept.size),
        "dropped": {r: int(sum(1 for s in status if s.startswith(r))) for r in DROP_REASONS},
        "bad_row_examples": [s[len("bad_row: "):] for s in status if s.startswith("bad_row")][:3],
        "truncated": int(np.asarray(encoded["truncated"])[kept].sum()),
        "tokens": int(np.asarray(encoded["length"], dtype=np.int64)[kept].sum()),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if kept.size == 0:
        raise ValueError(f"rlhf data: expected at least one usable pair, found none ({stats['dropped']}; "
                         f"e.g. {stats['bad_row_examples'][:1]})")
    dataset = encoded.select(kept.tolist()).remove_columns(["status", "truncated"]).flatten_indices()
    return PreprocessedPairs(dataset, stats)
