"""SFT data benchmarks: preprocessing throughput, packing fill ratio, packing time.

    .venv/bin/python benchmarks/sft_data.py [--samples 50000] [--num-proc 2]

1. Preprocessing a generated chat set (multi-turn, text from pydoc_data.topics) with the tiny
   tokenizer: samples/s and tokens/s of preprocess_sft, against a baseline measured in the same
   run: rendering each conversation once with the chat template and tokenizing it (no masks).
2. Packing fill ratio on a long-tailed (log-normal) length distribution, first-fit-decreasing
   against packing in data order (next fit). Goal: >= 97%.
3. Time to pack one million lengths. Goal: <= 1 s (needs the C++ op of megaswift.kernels).
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

from megaswift.data.sft.preprocess import SFTDataSettings, preprocess_sft  # noqa: E402
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


def bench_preprocess(num_samples: int, num_proc: int, work: Path) -> dict:
    tokenizer = build_tiny_tokenizer(work / "tokenizer")
    rows = chat_rows(num_samples, seed=0)
    data = work / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    start = time.perf_counter()  # baseline: one render + one tokenization per sample, nothing else
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    baseline_tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    baseline_s = time.perf_counter() - start

    settings = SFTDataSettings(datasets=[str(data)], max_length=4096, loss_on="all_assistant")
    result = preprocess_sft(settings, tokenizer, cache_dir=work / "cache", num_proc=num_proc)
    cached_start = time.perf_counter()
    preprocess_sft(settings, tokenizer, cache_dir=work / "cache", num_proc=num_proc, report=False)
    stats = result.stats
    return {
        "samples": num_samples, "num_proc": num_proc, "tokens": stats["tokens"],
        "samples_per_s": stats["samples_per_s"], "tokens_per_s": stats["tokens_per_s"],
        "seconds": stats["seconds"], "cache_load_seconds": round(time.perf_counter() - cached_start, 3),
        "baseline_render_tokenize_1proc": {"seconds": round(baseline_s, 3),
                                           "samples_per_s": round(num_samples / baseline_s, 1),
                                           "tokens_per_s": round(baseline_tokens / baseline_s, 1)},
        "pipeline_vs_baseline_samples_per_s": round(stats["samples_per_s"] / (num_samples / baseline_s), 3),
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
    parser.add_argument("--samples", type=int, default=50_000, help="chat samples to preprocess")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--pack-samples", type=int, default=1_000_000)
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/sft_data.json")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        preprocess = bench_preprocess(args.samples, args.num_proc, Path(tmp))
    results = {
        # the load average says how much other work shared the cores during the run
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "load_average_before": load_before,
                    "load_average_after_preprocess": os.getloadavg()[0]},
        "preprocess": preprocess,
        "packing_fill": bench_fill(100_000, args.capacity),
        "packing_time": bench_pack_time(args.pack_samples, args.capacity),
    }
    print(json.dumps(results, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
