"""A DPO step against an SFT step over the same tokens: time (precomputed reference) and peak memory.

The same generated conversations are trained two ways, both packed into rows of seq_length tokens with
the same global batch of rows: `megaswift rlhf` (each pair's chosen and rejected sequences in one row,
--rlhf.reference precomputed, and the frozen-copy reference for memory) and `megaswift sft` (the chosen
and the rejected conversation as two samples). Runs alternate (sft, dpo, sft, dpo, ...) in child
processes so machine noise hits both alike; each reports its median step time after warm-up (the first
steps, including the reference pass of the precomputed run, are left out). Peak memory is the child's
max RSS (CPU) or torch's peak allocation (GPU). The frozen copy's memory is measured on a model large
enough to show it by benchmarks/dpo_memory.py (here its ~13 MiB of weights are below RSS noise).

    python benchmarks/dpo_step.py [--rounds 3] [--steps 12] [--pairs 256]

Writes benchmarks/results/dpo_step_<device>.json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


def make_data(folder: Path, pairs: int) -> tuple[Path, Path]:
    """(preference jsonl, sft jsonl holding the same conversations as single samples)."""
    prefs, sft = [], []
    for i in range(pairs):
        words = lambda n, k: " ".join(WORDS[(i * 7 + j * k) % len(WORDS)] for j in range(n))
        prompt = [{"role": "user", "content": f"Continue: {words(3 + i % 5, 3)}"}]
        chosen = [{"role": "assistant", "content": words(6 + i % 9, 5)}]
        rejected = [{"role": "assistant", "content": words(4 + i % 11, 2)}]
        prefs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        sft += [{"messages": prompt + chosen}, {"messages": prompt + rejected}]
    paths = folder / "prefs.jsonl", folder / "sft.jsonl"
    for path, rows in zip(paths, (prefs, sft)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths



def make_workspace(folder: Path, pairs: int) -> tuple[Path, Path, Path]:
    """(tokenizer folder, preference jsonl, sft jsonl) in `folder`: what every DPO benchmark run reads."""
    from megaswift.data.tiny_tokenizer import build_tiny_tokenizer
    tokenizer = folder / "tokenizer"
    tokenizer.mkdir()
    build_tiny_tokenizer(tokenizer)
    return (tokenizer, *make_data(folder, pairs))

def child(kind: str, args, data: Path, tokenizer: Path, out: Path) -> dict:
    """One run in a child process: its step times and peak memory."""
    flags = {"model.preset": args.preset, "model.overrides": args.overrides, "data.datasets": data,
             "data.tokenizer": tokenizer, "data.seq_length": args.seq_length, "data.packing": "true",
             "data.loss_on": "last_round", "data.cache_dir": out / "cache",
             "train.micro_batch_size": args.micro_batch_size, "train.global_batch_size": args.global_batch_size,
             "train.train_iters": args.steps, "train.precision": args.precision, "train.lr_warmup_iters": 1,
             "logging.output_dir": out / "logs", "logging.progress_bar": "false", "logging.tensorboard": "false"}
    if kind != "sft":
        flags.update({"rlhf.type": "dpo", "rlhf.loss": "sigmoid",
                      "rlhf.reference": "precomputed" if kind == "dpo_precomputed" else "model"})
    command = [sys.executable, "-m", "megaswift", "sft" if kind == "sft" else "rlhf",
               *[item for key, value in flags.items() for item in (f"--{key}", str(value))]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{kind} run failed:\n{output[-4000:]}")
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in records if "step_time_s" in r][args.warmup:]
    return {"median_step_s": statistics.median(times), "max_rss_mib": usage.ru_maxrss / 1024,
            "tokens_per_step": args.global_batch_size * args.seq_length}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-llama")
    parser.add_argument("--overrides", default=json.dumps({"hidden_size": 256, "intermediate_size": 688,
                                                           "num_hidden_layers": 4, "num_attention_heads": 8,
                                                           "num_key_value_heads": 4}))
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()

    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer, prefs, sft = make_workspace(tmp, args.pairs)
        for r in range(args.rounds):
            results = {}
            for kind, data in (("sft", sft), ("dpo_precomputed", prefs), ("dpo_frozen_copy", prefs)):
                began = time.perf_counter()
                results[kind] = child(kind, args, data, tokenizer, tmp / f"{kind}_{r}")
                results[kind]["wall_s"] = round(time.perf_counter() - began, 1)
            results["ratio_precomputed_to_sft"] = results["dpo_precomputed"]["median_step_s"] / \
                results["sft"]["median_step_s"]
            print(json.dumps(results), flush=True)
            rounds.append(results)
    ratios = [r["ratio_precomputed_to_sft"] for r in rounds]
    summary = {
        "device": device, "settings": {k: v for k, v in vars(args).items()},
        "ratio_dpo_precomputed_to_sft_step": {"median": statistics.median(ratios), "min": min(ratios),
                                               "max": max(ratios)},
        "max_rss_mib": {kind: statistics.median(r[kind]["max_rss_mib"] for r in rounds)
                        for kind in ("sft", "dpo_precomputed", "dpo_frozen_copy")},
        "rounds": rounds,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"dpo_step_{device}.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("ratio_dpo_precomputed_to_sft_step", "max_rss_mib")}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
