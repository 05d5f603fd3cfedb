"""Benchmark first-fit-decreasing packing of one million sample lengths (target: <= 1 s).

The compiled op is timed end to end from a Python list of lengths to the list of bins (median
of --repeats runs), against the pure-Python reference on the same lengths (timed once), and the
two must return identical bins. Lengths are skewed like tokenized chat data: many short samples,
a long tail up to the capacity.

    python benchmarks/pack_speed.py
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from megaswift.kernels import kernel_report, pack_first_fit_decreasing, pack_first_fit_decreasing_reference

RESULTS = Path(__file__).resolve().parent / "results"


def chat_like_lengths(n: int, capacity: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.empty(n).log_normal_(mean=6.0, std=1.0, generator=g)  # median ~400 tokens
    return lengths.round().clamp(1, capacity).long().tolist()


def timed(fn, *args) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1_000_000)
    p.add_argument("--capacity", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS / "pack_speed.json")
    args = p.parse_args()
    lengths = chat_like_lengths(args.samples, args.capacity)

    runs = [timed(pack_first_fit_decreasing, lengths, args.capacity) for _ in range(args.repeats)]
    bins = runs[0][2]
    ref_wall, ref_cpu, ref_bins = timed(pack_first_fit_decreasing_reference, lengths, args.capacity)
    assert bins == ref_bins, "compiled and reference packings differ"
    fill = sum(lengths) / (len(bins) * args.capacity)
    report = {
        "benchmark": "pack_first_fit_decreasing, Python list in, bins out",
        "samples": args.samples, "capacity": args.capacity, "bins": len(bins), "mean_fill": fill,
        "path": kernel_report()["pack_first_fit_decreasing"]["cpu"],
        "compiled_wall_s_median": statistics.median(r[0] for r in runs),
        "compiled_cpu_s_median": statistics.median(r[1] for r in runs),
        "reference_wall_s": ref_wall, "reference_cpu_s": ref_cpu,
    }
    report["speedup_vs_reference_wall"] = ref_wall / report["compiled_wall_s_median"]
    print(f"{args.samples} lengths, capacity {args.capacity}: {len(bins)} bins, {fill:.1%} full ({report['path']})")
    print(f"  compiled  {report['compiled_wall_s_median']:.3f} s wall, {report['compiled_cpu_s_median']:.3f} s CPU")
    print(f"  reference {ref_wall:.3f} s wall, {ref_cpu:.3f} s CPU  -> {report['speedup_vs_reference_wall']:.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
