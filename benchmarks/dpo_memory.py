"""What the frozen-copy reference costs in memory: peak of a DPO run with --rlhf.reference model minus the
same run with --rlhf.reference precomputed, against the bytes of the copy's weights.

The issue's claim: "with the frozen copy, the extra memory is the copy's weights only" (no gradients,
optimizer state or second fp32 master copy for it). On CPU the model must be large enough that its weights
stand well above RSS noise (~tens of MiB) yet small enough that policy weights + gradients + Adam's two
moments + the copy stay under ~3 GiB per process: the default is a Llama of ~90M parameters (a 32k
vocabulary and 2 layers; the weights are what matters, not the depth) on short sequences.

Both runs start from the same checkpoint, made first by one `megaswift sft` step (so the frozen copy is
loaded from --checkpoint.load, as users run it). Runs alternate (model, precomputed, model, ...) in child
processes and every round is kept, so the spread shows. Peak memory is the child's max RSS (CPU) or torch's
peak allocation (GPU, not measured here). The copy's weight bytes are counted on a transformers model of
the same config built on the meta device (parameters x bytes per element of --precision).

    python benchmarks/dpo_memory.py [--rounds 3] [--steps 3]

Writes benchmarks/results/dpo_memory_<device>.json (no absolute paths).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_step import make_workspace  # noqa: E402  (same generated pairs as the step-time benchmark)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
OVERRIDES = {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 2,
             "num_attention_heads": 16, "num_key_value_heads": 4}
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def weight_bytes(preset: str, overrides: dict, precision: str) -> tuple[int, int]:
    """(parameters, bytes) of the model as transformers builds it (meta device: nothing allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from megaswift.models.families import preset_hf_config
    hf = {**preset_hf_config(preset), **overrides}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf))
    params = sum(p.numel() for p in model.parameters())
    return params, params * BYTES[precision]


def run_child(command: str, flags: dict, threads: int) -> tuple[int, str]:
    """(peak RSS in bytes, output) of one `megaswift COMMAND` child process."""
    argv = [sys.executable, "-m", "megaswift", command,
            *[item for key, value in flags.items() for item in (f"--{key}", str(value))]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"megaswift {command} failed:\n{output[-4000:]}")
    return usage.ru_maxrss * 1024, output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-llama")
    parser.add_argument("--overrides", default=json.dumps(OVERRIDES))
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--global-batch-size", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (Adam's state exists "
                                                               "from the first)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()
    overrides = json.loads(args.overrides)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    params, copy_bytes = weight_bytes(args.preset, overrides, args.precision)
    mib = lambda b: round(b / 2 ** 20, 1)
    print(f"model: {params / 1e6:.1f}M parameters, {mib(copy_bytes)} MiB of {args.precision} weights", flush=True)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer, prefs, sft = make_workspace(tmp, args.pairs)
        common = {"data.tokenizer": tokenizer, "data.seq_length": args.seq_length, "data.packing": "true",
                  "data.loss_on": "last_round", "data.cache_dir": tmp / "cache",
                  "train.micro_batch_size": args.micro_batch_size, "train.global_batch_size": args.global_batch_size,
                  "train.precision": args.precision, "train.lr_warmup_iters": 1,
                  "logging.progress_bar": "false", "logging.tensorboard": "false"}
        start = tmp / "sft_start"
        run_child("sft", {**common, "model.preset": args.preset, "model.overrides": json.dumps(overrides),
                          "data.datasets": sft, "train.train_iters": 1, "checkpoint.save": start,
                          "logging.output_dir": tmp / "sft_logs"}, args.threads)
        for r in range(args.rounds):
            result = {}
            for reference in ("model", "precomputed"):
                out = tmp / f"{reference}_{r}"
                peak, _ = run_child("rlhf", {**common, "data.datasets": prefs, "checkpoint.load": start,
                                             "checkpoint.finetune": "true", "train.train_iters": args.steps,
                                             "rlhf.type": "dpo", "rlhf.loss": "sigmoid",
                                             "rlhf.reference": reference, "logging.output_dir": out}, args.threads)
                result[f"peak_rss_mib_{reference}"] = mib(peak)
            result["extra_mib"] = round(result["peak_rss_mib_model"] - result["peak_rss_mib_precomputed"], 1)
            result["extra_over_weights"] = round(result["extra_mib"] / mib(copy_bytes), 3)
            print(json.dumps(result), flush=True)
            rounds.append(result)
    ratios = [r["extra_over_weights"] for r in rounds]
    extras = [r["extra_mib"] for r in rounds]
    summary = {
        "device": device, "measure": "peak RSS of the child process" if device == "cpu" else "peak RSS",
        "settings": vars(args), "parameters": params, "copy_weight_mib": mib(copy_bytes),
        "extra_mib": {"median": statistics.median(extras), "min": min(extras), "max": max(extras)},
        "extra_over_copy_weights": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "rounds": rounds,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"dpo_memory_{device}.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("copy_weight_mib", "extra_mib", "extra_over_copy_weights")}))
    print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
