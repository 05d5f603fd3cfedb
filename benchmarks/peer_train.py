"""Peer benchmark: `megaswift pt` against the hand-written megatron-core loop, Hugging Face Trainer (plain, and with
DeepSpeed ZeRO-2 and ZeRO-3) and torchtitan: same model shape, data rows, tokens per step and precision, in one run.

Every contender trains in a child process of its own (bench_harness.measure); rounds alternate the contenders
(A B C ... A B C ...) so machine noise hits all alike, and the ratios against megaswift are taken within each round,
then summarised with their spread (min / median / max over rounds). Per contender: tokens/s (median step after
warm-up), MFU where the device's peak is known, peak memory (GPU: torch's max allocated; CPU: the child's max RSS,
imports included). A contender that cannot run here is recorded under `skipped` with the reason. Writes
benchmarks/results/peer_train_<cpu|gpu>.json.

    python benchmarks/peer_train.py                         # tiny CPU shape (CI keeps it working)

On one H200 (bf16; the HF contenders get gradient checkpointing whenever megaswift gets recompute):

    python benchmarks/peer_train.py --preset llama-3.2-1b --overrides '{}' --seq-length 4096 --precision bf16 \\
        --micro-batch-size 1 --global-batch-size 8 --steps 30 --warmup 5 --rounds 3
    QWEN3_4B='{"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "tie_word_embeddings": true}'
    python benchmarks/peer_train.py --preset qwen3-8b --overrides "$QWEN3_4B" --seq-length 4096 --precision bf16 \\
        --micro-batch-size 1 --global-batch-size 8 --steps 20 --warmup 5 --rounds 2 \\
        --perf '{"recompute": "full", "recompute_method": "uniform", "recompute_num_layers": 1}' \\
        --contenders megaswift,hf_trainer,hf_deepspeed_zero3

The second is the Qwen3-4B shape, the largest Qwen3/Llama shape expected to fit one H200 with recompute:
megaswift keeps 18 bytes a parameter at one GPU (bf16 weights, fp32 main gradients, fp32 master weights and two
Adam moments), so an 8B model (~145 GB) would need --perf '{"optimizer_cpu_offload": true}' (an estimate, not yet
measured). The bare loop has no recompute and is left out there.

DeepSpeed comes with the `bench` extra (`pip install -e '.[bench]'`). torchtitan is skipped with its reason: its
Trainer picks `cuda` when no accelerator is found, so it never runs on CPU, and torchtitan 0.3.0 pins datasets<4.8
(this project runs datasets 5), so it is no extra of this project; docs/performance.md gives its own command, in
a venv of its own, for the GPU machine.
"""
import argparse
import importlib.util
import json
import os
import socket
import time
from pathlib import Path

from bench_harness import (add_run_arguments, check_run_arguments, measure, portable, print_result, settings,
                           spread)

CONTENDERS = ("megaswift", "mcore_loop", "hf_trainer", "hf_deepspeed_zero2", "hf_deepspeed_zero3", "torchtitan")
ZERO_STAGE = {"hf_deepspeed_zero2": 2, "hf_deepspeed_zero3": 3}


def skip_reason(mode: str, on_gpu: bool) -> str | None:
    """Why `mode` cannot run on this machine, or None. Checked before any child starts."""
    if mode in ZERO_STAGE and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install -e '.[bench]')"
    if mode == "torchtitan":
        if not on_gpu:
            return ("torchtitan's Trainer needs an accelerator: with none found it picks 'cuda' and calls "
                    "torch.cuda.set_device (torchtitan 0.3.0)")
        return ("torchtitan is run by its own trainer, not from this script (torchtitan 0.3.0 pins datasets<4.8, "
                "which this project's environment cannot take): see docs/performance.md")
    return None


def token_rows(config: dict, hf: dict) -> list:
    """The rows megaswift trains on (same dataset, seed and order), one sample per row."""
    from megaswift.config import DataConfig
    from megaswift.data.pretrain import PretrainData, token_ids_from_tokenizer
    t, data = config["train"], DataConfig(**config["data"])
    samples = t["train_iters"] * t["global_batch_size"]
    source = PretrainData(data, token_ids_from_tokenizer(data.tokenizer, hf["vocab_size"]), 1234, 1, samples, 0)
    iterator = source.train_iterators(0, 0, 1, 1)[0]
    return [next(iterator)["tokens"][0] for _ in range(samples)]


def deepspeed_config(stage: int, on_gpu: bool) -> dict:
    """The ZeRO config most HF users start from; "auto" takes batch, accumulation, clipping, lr and bf16 from
    TrainingArguments, so every contender steps on the same tokens."""
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
            # torch's AdamW: DeepSpeed's own FusedAdam / CPUAdam are JIT-compiled C++/CUDA ops, minutes to build
            # and a compiler (nvcc) the GPU image may not have
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                      "weight_decay": "auto", "torch_adam": True}},
            "zero_optimization": {"stage": stage, "overlap_comm": on_gpu, "contiguous_gradients": True}}


def single_process_group_env(on_gpu: bool) -> None:
    """DeepSpeed initialises torch.distributed from these even for one process (HF Trainer outside a launcher)."""
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # its CPU accelerator, gloo/shared-memory collectives
    with socket.socket() as s:  # a free port: parallel test workers and other runs must not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)


def run_hf_trainer(config: dict, out: Path, zero_stage: int | None = None) -> list[float]:
    """transformers' Trainer (AdamW, batch and accumulation as megaswift's) on the same HF model and token rows;
    with `zero_stage`, under DeepSpeed ZeRO at that stage."""
    import torch
    on_gpu = torch.cuda.is_available()
    if zero_stage is not None:
        single_process_group_env(on_gpu)
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from megaswift.models import preset_hf_config

    hf = {**preset_hf_config(config["model"]["preset"]), **config["model"]["overrides"]}
    t = config["train"]
    bf16 = t["precision"] == "bf16"
    # fp32 weights with bf16 autocast (Trainer) or DeepSpeed's bf16 copy of them: the mixed precision HF users
    # run, as megaswift keeps fp32 main weights and gradients under bf16
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{k: v for k, v in hf.items()
                                                                     if k not in ("architectures",)}),
                                             dtype=torch.float32)
    rows = token_rows(config, hf)

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
            if on_gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.began)

    arguments = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=t["micro_batch_size"],
        gradient_accumulation_steps=t["global_batch_size"] // t["micro_batch_size"], max_steps=t["train_iters"],
        learning_rate=1e-3, warmup_steps=t.get("lr_warmup_iters", 0), max_grad_norm=1.0, bf16=bf16,
        optim="adamw_torch", report_to=[], save_strategy="no", logging_steps=10**6, dataloader_num_workers=0,
        gradient_checkpointing=config.get("perf", {}).get("recompute", "none") != "none",
        deepspeed=None if zero_stage is None else deepspeed_config(zero_stage, on_gpu),
        use_cpu=not on_gpu, disable_tqdm=True, seed=1234)
    Trainer(model=model, args=arguments, train_dataset=Rows(), callbacks=[StepTimes()]).train()
    return times


def child(mode: str, config_json: str, out: str) -> None:
    config = json.loads(config_json)
    from train_throughput import run_baseline, run_megaswift
    if mode == "megaswift":
        times = run_megaswift(config, Path(out))
    elif mode == "mcore_loop":
        times = run_baseline(config)
    else:
        times = run_hf_trainer(config, Path(out), ZERO_STAGE.get(mode))
    print_result(times)


def summarise(rounds: list[dict], tokens_per_step: int, flops_per_step: float, peak_flops: float | None) -> dict:
    summary = {}
    for mode in rounds[0]:
        steps = [r[mode]["median_step_s"] for r in rounds]
        summary[mode] = {"tokens_per_s": spread([tokens_per_step / s for s in steps]),
                         "peak_memory_gib": max(r[mode]["peak_memory_bytes"] for r in rounds) / 2**30,
                         # each contender against megaswift in the same round: > 1 is faster than megaswift
                         "ratio_to_megaswift": spread([r["megaswift"]["median_step_s"] / r[mode]["median_step_s"]
                                                       for r in rounds])}
        if peak_flops:
            summary[mode]["mfu"] = spread([flops_per_step / s / peak_flops for s in steps])
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, steps=12, warmup=3, rounds=3, results="peer_train_<cpu|gpu>.json")
    parser.add_argument("--perf", default="{}", help="megaswift's perf section, as JSON (recompute, fusions, ...)")
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="OMP_NUM_THREADS of every contender on CPU (0 or less: leave it unset)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help="comma-separated subset of " + ", ".join(CONTENDERS) + " (megaswift always runs)")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.config_json, args.out)
    check_run_arguments(parser, args)
    chosen = [name.strip() for name in args.contenders.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(CONTENDERS))
    if unknown:
        parser.error(f"--contenders: unknown {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")

    import torch
    on_gpu = torch.cuda.is_available()
    skipped = {mode: reason for mode in chosen if (reason := skip_reason(mode, on_gpu))}
    running = ["megaswift"] + [mode for mode in chosen if mode != "megaswift" and mode not in skipped]

    from megaswift.data.demo import prepare_demo_data
    data_dir = Path(args.data_dir)
    prepare_demo_data(data_dir)
    config = settings(args, data_dir)
    config["perf"] = json.loads(args.perf)
    # On a shared CPU machine, OpenMP threads that outnumber the free cores spin at every parallel region, and
    # contenders suffered from it unequally (up to 10x per step, measured); one thread each measures the
    # frameworks, not the contention. On a GPU the host threads are left as they are.
    threads = {} if on_gpu or args.cpu_threads <= 0 else {"OMP_NUM_THREADS": str(args.cpu_threads)}
    rounds = []
    for index in range(args.rounds):
        rounds.append({})
        for mode in running:
            print(f"round {index + 1}/{args.rounds}: {mode}", flush=True)  # a GPU round takes minutes
            rounds[-1][mode] = measure(Path(__file__), mode, config, args.warmup, env_extra=threads)

    from megaswift.models import preset_hf_config
    from megaswift.train.metrics import device_peak_flops, flops_per_token
    hf = {**preset_hf_config(args.preset), **json.loads(args.overrides)}
    tokens = args.global_batch_size * args.seq_length
    summary = summarise(rounds, tokens, flops_per_token(hf, args.seq_length) * tokens, device_peak_flops())
    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    result = {"benchmark": "peer_train", "device": device, "config": portable(config), "tokens_per_step": tokens,
              "warmup_steps": args.warmup, "cpu_threads": threads.get("OMP_NUM_THREADS"), "rounds": rounds, "summary": summary, "skipped": skipped}
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"peer_train_{'gpu' if on_gpu else 'cpu'}.json").write_text(json.dumps(result, indent=2))
    for mode, row in summary.items():
        ratio = row["ratio_to_megaswift"]
        print(f"{mode:19s} {row['tokens_per_s']['median']:10.0f} tokens/s  x{ratio['median']:.3f} of megaswift "
              f"(min {ratio['min']:.3f}, max {ratio['max']:.3f})  peak {row['peak_memory_gib']:.2f} GiB")
    for mode, reason in skipped.items():
        print(f"{mode:19s} skipped: {reason}")


if __name__ == "__main__":
    main()
