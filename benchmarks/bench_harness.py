"""What the training benchmarks (train_throughput.py, peer_train.py) share: the model shape and batch flags, the
run settings built from them, one contender's run in a child process of its own, and min/median/max summaries.

A contender runs in a fresh child so that its imports, allocator state and peak memory are its own and one
contender's warm caches never speed up the next. The child prints one `RESULT {json}` line (step times and peak
memory); everything else it prints is left alone, and its stderr tail is the error when it fails.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RESULT_PREFIX = "RESULT "


def add_run_arguments(parser, steps: int, warmup: int, rounds: int, results: str) -> None:
    """The model shape, batch, precision and rounds of a training benchmark, and the child-process flags."""
    parser.add_argument("--preset", default="tiny-llama")
    parser.add_argument("--overrides", default='{"hidden_size": 256, "intermediate_size": 688, '
                                               '"num_attention_heads": 8, "num_key_value_heads": 4}',
                        help="HF config fields over the preset's, as JSON")
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=warmup, help="first steps left out of the median step time")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--data-dir", default=str(REPO / "runs" / "bench_data"),
                        help="where the demo tokenizer and indexed corpus are written (reused when present)")
    parser.add_argument("--results-dir", default=str(RESULTS), help=f"where {results} goes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config-json", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)


def check_run_arguments(parser, args) -> None:
    """Errors a user can fix before any child starts (a child's traceback would bury them)."""
    if args.global_batch_size % args.micro_batch_size:
        parser.error(f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size "
                     f"{args.micro_batch_size}: every contender runs global/micro accumulation steps")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must be >= 0 and below --steps {args.steps}, so that some steps "
                     f"are measured")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least 1 round is needed")


def settings(args, data_dir: Path) -> dict:
    """megaswift's run config for the benchmark shape; the other contenders read the same dict."""
    tokenizer, prefix = data_dir / "tokenizer", data_dir / "pydoc_text_document"
    return {"model": {"preset": args.preset, "overrides": json.loads(args.overrides)},
            "data": {"paths": [str(prefix)], "tokenizer": str(tokenizer), "seq_length": args.seq_length,
                     "split": "100,0,0"},
            "train": {"micro_batch_size": args.micro_batch_size, "global_batch_size": args.global_batch_size,
                      "train_iters": args.steps, "precision": args.precision, "lr_warmup_iters": 2},
            "logging": {"progress_bar": False, "tensorboard": False, "log_interval": 1}}


def portable(config: dict) -> dict:
    """The config as recorded in a results file: data paths relative to the repository (or just their names), so
    results written on one machine carry no path of that machine."""
    def short(path: str) -> str:
        p = Path(path)
        return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else p.name
    data = config["data"]
    return {**config, "data": {**data, "paths": [short(p) for p in data["paths"]],
                               "tokenizer": short(data["tokenizer"])}}


def peak_memory_bytes() -> int:
    """GPU: torch's max allocated; CPU: this process's max resident set (imports included)."""
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def print_result(step_times: list[float]) -> None:
    """The child's one line for measure()."""
    print(RESULT_PREFIX + json.dumps({"step_times": step_times, "peak_memory_bytes": peak_memory_bytes()}),
          flush=True)


def measure(script: Path, mode: str, config: dict, warmup: int, timeout_s: float = 3600,
            env_extra: dict | None = None) -> dict:
    """Runs `script --child mode` in a fresh process (its environment plus `env_extra`); returns its median step
    time after `warmup` steps and its peak memory."""
    with tempfile.TemporaryDirectory() as out:
        # keep the caller's PYTHONPATH: on the GPU machine it holds the carried megatron-core wheel
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               **(env_extra or {})}
        proc = subprocess.run([sys.executable, str(script), "--child", mode, "--config-json", json.dumps(config),
                               "--out", out], capture_output=True, text=True, env=env, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"the {mode} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise RuntimeError(f"the {mode} run exited 0 without its {RESULT_PREFIX.strip()} line; stdout ends:\n"
                           f"{proc.stdout[-2000:]}")
    found = json.loads(lines[-1][len(RESULT_PREFIX):])
    times = found["step_times"]
    if len(times) <= warmup:
        raise RuntimeError(f"the {mode} run timed {len(times)} steps, not more than the {warmup} warm-up steps")
    return {"median_step_s": statistics.median(times[warmup:]), "steps_timed": len(times) - warmup,
            "peak_memory_bytes": found["peak_memory_bytes"]}


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}
