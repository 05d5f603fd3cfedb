"""SFT data benchmarks: encoding speed against a plain render + tokenize, packing fill ratio, packing time.

    .venv/bin/python benchmarks/sft_data.py [--samples 6000] [--rounds 3]

1. Encoding speed per process (goal: >= 0.8x of the plain render + tokenize). A generated chat set
   (multi-turn, text from pydoc_data.topics) with the tiny tokenizer. Each round times, in alternating
   order, on the same rows and in batches of 256:
     baseline   tokenizer.apply_chat_template(..., tokenize=False) per row + tokenizer(batch): the plain
                render + tokenize (the issue's yardstick);
     fast       SFTTemplate.encode_batch: input_ids, labels, loss_scale (the path preprocess_sft runs);
     exact      SFTTemplate.encode_exact row by row (the reference path, the speed before), on a tenth of
                the rows;
   for loss_on all_assistant (every assistant turn located) and last_round. The ratio is fast samples/s
   over baseline samples/s within a round; the report gives the median and the spread (min, max) over
   rounds, in process CPU time (what other programs on a loaded machine do not change) and in wall time.
   The Rust tokenizer runs single-threaded (TOKENIZERS_PARALLELISM=false): per process, as with
   preprocess_sft's worker processes.
2. The whole pipeline (preprocess_sft, num_proc=1, no cache: reading the jsonl, normalising, encoding,
   writing the Arrow dataset) against the same baseline, alternated the same way.
3. Packing fill ratio on a long-tailed (log-normal) length distribution, first-fit-decreasing
   against packing in data order (next fit). Goal: >= 97%.
4. Time to pack one million lengths. Goal: <= 1 s (needs the C++ op of megaswift.kernels).
Writes benchmarks/results/sft_data.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # per-process figures: one tokenizer thread (see 1.)

from megaswift.data.sft.loss_scale import load_loss_scale  # noqa: E402
from megaswift.data.sft.preprocess import SFTDataSettings, preprocess_sft  # noqa: E402
from megaswift.data.sft.template import SFTTemplate  # noqa: E402
from megaswift.data.tiny_tokenizer import build_tiny_tokenizer  # noqa: E402
from megaswift.kernels import _dispatch, pack_first_fit_decreasing  # noqa: E402


def chat_rows(n: int, seed: int) -> list[dict]:
    from pydoc_data.topics import topics

    sentences = [s.strip() + "." for key in sorted(topics) for s in topics[key].split(". ") if 20 < len(s) < 300]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": rng.choice(sentences)}] if rng.random() < 0.3 else []
        for _ in range(rng.choice([1, 1, 2, 3])):
            messages.append({"role": "user", "content": rng.choice(sentences)})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(sentences, k=rng.randint(1, 6)))})
        rows.append({"messages": messages})
    return rows


BATCH = 256  # rows per tokenizer call, as preprocess_sft's datasets.map batches


class _Timer:
    """Wall and process-CPU seconds of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def _baseline(tokenizer, rows: list[dict]) -> int:
    """The plain render + tokenize; returns the token count."""
    tokens = 0
    for i in range(0, len(rows), BATCH):
        texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows[i:i + BATCH]]
        tokens += sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return tokens


def _fast(template: SFTTemplate, rows: list[dict]) -> int:
    encoded = [e for i in range(0, len(rows), BATCH) for e in template.encode_batch(rows[i:i + BATCH])]
    return sum(len(e.input_ids) + 1 for e in encoded if not e.drop_reason)


def _exact(template: SFTTemplate, rows: list[dict]) -> int:
    return sum(len(e.input_ids) + 1 for e in map(template.encode_exact, rows) if not e.drop_reason)


def _spread(values: list[float]) -> dict:
    return {"median": round(float(np.median(values)), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "rounds": [round(v, 3) for v in values]}


def _ratios(runs: dict, name: str, clock: str) -> dict:
    return _spread([b[clock] / r[clock] for b, r in zip(runs["baseline"], runs[name])])


def bench_encode(tokenizer, rows: list[dict], rounds: int) -> dict:
    results = {}
    for loss_on in ("all_assistant", "last_round"):
        template = SFTTemplate(tokenizer, loss_on, max_length=4096, loss_scale=load_loss_scale("default"))
        assert template.fast_path(), "the tiny ChatML template takes the fast path"
        subset = rows[:max(len(rows) // 10, 1)]
        assert template.encode_batch(subset) == [template.encode_exact(r) for r in subset]  # same rows
        runs = {"baseline": [], "fast": [], "exact": []}
        for round_index in range(rounds):
            order = [("baseline", _baseline, tokenizer, rows), ("fast", _fast, template, rows)]
            order = order if round_index % 2 == 0 else order[::-1]  # alternate who goes first
            for name, run, target, data in order + [("exact", _exact, template, subset)]:
                with _Timer() as timer:
                    tokens = run(target, data)
                runs[name].append({"wall": timer.wall / len(data), "cpu": timer.cpu / len(data), "tokens": tokens})
        results[loss_on] = {
            "samples": len(rows), "exact_samples": len(subset),
            "samples_per_s_cpu": {name: _spread([1 / r["cpu"] for r in values]) for name, values in runs.items()},
            "samples_per_s_wall": {name: _spread([1 / r["wall"] for r in values]) for name, values in runs.items()},
            "fast_vs_baseline_cpu": _ratios(runs, "fast", "cpu"),
            "fast_vs_baseline_wall": _ratios(runs, "fast", "wall"),
            "exact_vs_baseline_cpu": _ratios(runs, "exact", "cpu"),
            "fast_vs_exact_cpu": _spread([e["cpu"] / f["cpu"] for e, f in zip(runs["exact"], runs["fast"])]),
        }
    return results


def bench_pipeline(tokenizer, rows: list[dict], rounds: int, num_proc: int, work: Path) -> dict:
    data = work / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = SFTDataSettings(datasets=[str(data)], max_length=4096, loss_on="all_assistant")
    runs = {"baseline": [], "pipeline": []}
    for round_index in range(rounds):
        order = [("baseline", lambda: _baseline(tokenizer, rows)),
                 ("pipeline", lambda: preprocess_sft(settings, tokenizer, num_proc=num_proc, report=False))]
        for name, run in (order if round_index % 2 == 0 else order[::-1]):
            with _Timer() as timer:
                run()
            runs[name].append({"wall": timer.wall / len(rows), "cpu": timer.cpu / len(rows)})
    cached = work / "cache"
    preprocess_sft(settings, tokenizer, cache_dir=cached, num_proc=num_proc, report=False)
    with _Timer() as timer:
        preprocess_sft(settings, tokenizer, cache_dir=cached, num_proc=num_proc, report=False)
    return {
        "samples": len(rows), "num_proc": num_proc,
        "samples_per_s_wall": {name: _spread([1 / r["wall"] for r in values]) for name, values in runs.items()},
        "pipeline_vs_baseline_wall": _ratios(runs, "pipeline", "wall"),
        # with num_proc > 1 the workers' CPU time is not this process's: the CPU ratio is for num_proc=1
        **({"pipeline_vs_baseline_cpu": _ratios(runs, "pipeline", "cpu")} if num_proc == 1 else {}),
        "cache_load_seconds": round(timer.wall, 3),
    }


def long_tailed_lengths(n: int, capacity: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=6.0, sigma=1.0, size=n).astype(np.int64), 1, capacity)


def next_fit_bins(lengths: np.ndarray, capacity: int) -> int:
    bins, room = 0, 0
    for n in lengths.tolist():
        if n > room:
            bins, room = bins + 1, capacity
        room -= n
    return bins


def bench_fill(num_samples: int, capacity: int) -> dict:
    lengths = long_tailed_lengths(num_samples, capacity, seed=1)
    bins = pack_first_fit_decreasing(lengths.tolist(), capacity)
    assert all(sum(int(lengths[i]) for i in b) <= capacity for b in bins)
    total = int(lengths.sum())
    return {"samples": num_samples, "capacity": capacity, "mean_length": round(total / num_samples, 1),
            "p50_length": int(np.median(lengths)), "max_length": int(lengths.max()),
            "ffd_fill_ratio": round(total / (len(bins) * capacity), 4),
            "next_fit_in_data_order_fill_ratio": round(total / (next_fit_bins(lengths, capacity) * capacity), 4),
            "goal_fill_ratio": 0.97}


def bench_pack_time(num_samples: int, capacity: int) -> dict:
    lengths = long_tailed_lengths(num_samples, capacity, seed=2).tolist()
    uses_extension = _dispatch.extension_for("pack_first_fit_decreasing", "cpu") is not None
    start = time.perf_counter()
    bins = pack_first_fit_decreasing(lengths, capacity)
    seconds = time.perf_counter() - start
    return {"samples": num_samples, "capacity": capacity, "bins": len(bins), "seconds": round(seconds, 3),
            "implementation": "C++ extension" if uses_extension else "pure-Python reference",
            "goal_seconds": 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=6000, help="chat samples to encode")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds (>= 3 for a spread)")
    parser.add_argument("--num-proc", type=int, default=1, help="preprocess_sft worker processes")
    parser.add_argument("--pack-samples", type=int, default=1_000_000)
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/sft_data.json")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rows = chat_rows(args.samples, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tiny_tokenizer(Path(tmp) / "tokenizer")
        encode = bench_encode(tokenizer, rows, args.rounds)
        load_after_encode = os.getloadavg()[0]
        pipeline = bench_pipeline(tokenizer, rows, args.rounds, args.num_proc, Path(tmp))
    results = {
        # the load average says how much other work shared the cores during the run; CPU-time ratios do not
        # depend on it, wall-time ratios do
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "load_average_before": load_before,
                    "load_average_after_encode": load_after_encode,
                    "load_average_after_pipeline": os.getloadavg()[0],
                    "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM")},
        "goal_fast_vs_baseline": 0.8,
        "encode": encode,
        "pipeline": pipeline,
        "packing_fill": bench_fill(100_000, args.capacity),
        "packing_time": bench_pack_time(args.pack_samples, args.capacity),
    }
    print(json.dumps(results, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
