"""Peer benchmark: `megaswift pt` against the hand-written megatron-core loop and Hugging Face Trainer, same model
shape, data, batch and precision, in one run.

Every contender trains in a child process of its own; rounds alternate the contenders (A B C A B C ...) so machine
noise hits all alike, and the ratios against megaswift are taken within each round, then summarised with their
spread (min / median / max over rounds). Per contender: tokens/s (median step after warm-up), MFU where the
device's peak is known, peak memory (GPU: torch's max allocated; CPU: the child's max RSS). Writes
benchmarks/results/peer_train_<device>.json.

    python benchmarks/peer_train.py                         # tiny CPU shape (CI keeps it working)
    python benchmarks/peer_train.py --preset llama-3.2-1b --overrides '{}' --seq-length 4096 --precision bf16 \
        --micro-batch-size 1 --global-batch-size 8 --perf '{"recompute": "none"}'   # the GPU shape

Not here yet: DeepSpeed ZeRO-2/3 under HF Trainer and torchtitan (both need packages this project does not
install; add them as contenders where they are installed: a `run_<name>(config) -> (step_times, peak_bytes)`).
"""
import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CONTENDERS = ("megaswift", "mcore_loop", "hf_trainer")


def _train_throughput():
    """The megaswift run and the bare megatron-core loop of benchmarks/train_throughput.py (one definition)."""
    spec = importlib.util.spec_from_file_location("train_throughput", Path(__file__).with_name("train_throughput.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peak_memory_bytes() -> int:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_hf_trainer(config: dict, out: Path) -> list[float]:
    """transformers' Trainer (AdamW, same lr, batch and accumulation) on the same HF model and token rows."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from megaswift.config import DataConfig
    from megaswift.data.pretrain import PretrainData, token_ids_from_tokenizer
    from megaswift.models import preset_hf_config

    hf = {**preset_hf_config(config["model"]["preset"]), **config["model"]["overrides"]}
    t, data = config["train"], DataConfig(**config["data"])
    bf16 = t["precision"] == "bf16"
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{k: v for k, v in hf.items()
                                                                     if k not in ("architectures",)}),
                                             torch_dtype=torch.bfloat16 if bf16 else torch.float32)
    samples = t["train_iters"] * t["global_batch_size"]
    source = PretrainData(data, token_ids_from_tokenizer(data.tokenizer, hf["vocab_size"]), 1234, 1, samples, 0)
    iterator = source.train_iterators(0, 0, 1, 1)[0]
    rows = [next(iterator)["tokens"][0] for _ in range(samples)]

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, index):
            return {"input_ids": rows[index], "labels": rows[index]}  # the model shifts labels itself

    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.began)

    arguments = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=t["micro_batch_size"],
        gradient_accumulation_steps=t["global_batch_size"] // t["micro_batch_size"], max_steps=t["train_iters"],
        learning_rate=1e-3, warmup_steps=t.get("lr_warmup_iters", 0), max_grad_norm=1.0, bf16=bf16,
        optim="adamw_torch", report_to=[], save_strategy="no", logging_steps=10**6, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=1234)
    Trainer(model=model, args=arguments, train_dataset=Rows(), callbacks=[StepTimes()]).train()
    return times


def child(mode: str, config_json: str, out: str) -> None:
    config = json.loads(config_json)
    bench = _train_throughput()
    run = {"megaswift": bench.run_megaswift, "mcore_loop": lambda c, _: bench.run_baseline(c),
           "hf_trainer": run_hf_trainer}[mode]
    times = run(config, Path(out))
    print("RESULT " + json.dumps({"step_times": times, "peak_memory_bytes": peak_memory_bytes()}))


def measure(mode: str, config: dict, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--config-json", json.dumps(config),
                               "--out", out], capture_output=True, text=True, env=env, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-4000:]}")
        line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
        found = json.loads(line.split(" ", 1)[1])
        return {"median_step_s": statistics.median(found["step_times"][warmup:]),
                "peak_memory_bytes": found["peak_memory_bytes"]}


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarise(rounds: list[dict], tokens_per_step: int, flops_per_step: float, peak_flops: float | None) -> dict:
    summary = {}
    for mode in CONTENDERS:
        steps = [r[mode]["median_step_s"] for r in rounds]
        tokens_per_s = [tokens_per_step / s for s in steps]
        summary[mode] = {"tokens_per_s": spread(tokens_per_s),
                         "peak_memory_gib": max(r[mode]["peak_memory_bytes"] for r in rounds) / 2**30,
                         # each contender measured against megaswift in the same round
                         "ratio_to_megaswift": spread([r["megaswift"]["median_step_s"] / r[mode]["median_step_s"]
                                                       for r in rounds])}
        if peak_flops:
            summary[mode]["mfu"] = spread([flops_per_step / s / peak_flops for s in steps])
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _train_throughput().add_run_arguments(parser, steps=12, warmup=3, rounds=3, results="peer_train_<device>.json")
    parser.add_argument("--perf", default="{}", help="megaswift's perf section, as JSON (recompute, fusions, ...)")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.config_json, args.out)
    from megaswift.data.demo import prepare_demo_data
    data_dir = REPO / "runs" / "bench_data"
    prepare_demo_data(data_dir)
    config = _train_throughput().settings(args, data_dir)
    config["perf"] = json.loads(args.perf)
    rounds = [{mode: measure(mode, config, args.warmup) for mode in CONTENDERS} for _ in range(args.rounds)]

    import torch

    from megaswift.models import preset_hf_config
    from megaswift.train.metrics import device_peak_flops, flops_per_token
    hf = {**preset_hf_config(args.preset), **json.loads(args.overrides)}
    tokens = args.global_batch_size * args.seq_length
    summary = summarise(rounds, tokens, flops_per_token(hf, args.seq_length) * tokens, device_peak_flops())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"benchmark": "peer_train", "device": device, "config": config, "rounds": rounds, "summary": summary,
              "not_measured": {"hf_trainer_deepspeed_zero2": "deepspeed is not installed",
                               "hf_trainer_deepspeed_zero3": "deepspeed is not installed",
                               "torchtitan": "torchtitan is not installed"}}
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"peer_train_{'cpu' if device == 'cpu' else 'gpu'}.json").write_text(json.dumps(result, indent=2))
    for mode, row in summary.items():
        print(f"{mode:11s} {row['tokens_per_s']['median']:10.0f} tokens/s  x{row['ratio_to_megaswift']['median']:.3f} "
              f"of megaswift (min {row['ratio_to_megaswift']['min']:.3f}, max {row['ratio_to_megaswift']['max']:.3f})"
              f"  peak {row['peak_memory_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
