"""tokens/s of `megaswift pt` against a minimal hand-written megatron-core loop, same model, data and layout.

Both run in child processes, alternated (A B A B ...) so machine noise hits both alike; each reports the
median step time after warm-up. Writes benchmarks/results/train_throughput_<device>.json.

    python benchmarks/train_throughput.py [--preset tiny-llama] [--steps 30] [--rounds 2]
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


def settings(args, data_dir: Path) -> dict:
    tokenizer, prefix = data_dir / "tokenizer", data_dir / "pydoc_text_document"
    return {"model": {"preset": args.preset, "overrides": json.loads(args.overrides)},
            "data": {"paths": [str(prefix)], "tokenizer": str(tokenizer), "seq_length": args.seq_length,
                     "split": "100,0,0"},
            "train": {"micro_batch_size": args.micro_batch_size, "global_batch_size": args.global_batch_size,
                      "train_iters": args.steps, "precision": args.precision, "lr_warmup_iters": 2},
            "logging": {"progress_bar": False, "tensorboard": False, "log_interval": 1}}


def run_megaswift(config: dict, out: Path) -> list[float]:
    from megaswift.config import PretrainConfig, config_from_dict
    from megaswift.objectives.pretrain import PretrainObjective
    from megaswift.train.trainer import Trainer
    config["logging"]["output_dir"] = str(out)
    cfg = config_from_dict(PretrainConfig, config)
    Trainer(cfg, PretrainObjective()).run()
    return [json.loads(line)["step_time_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_baseline(config: dict) -> list[float]:
    """The least code that trains the same model with megatron-core: no megaswift module in the loop."""
    import torch
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megaswift.config import ParallelConfig
    from megaswift.data.pretrain import PretrainData, token_ids_from_tokenizer
    from megaswift.config import DataConfig
    from megaswift.models import gpt_model_kwargs, hf_to_transformer_config, preset_hf_config
    from megaswift.train.distributed import init_distributed, shutdown_distributed

    hf = {**preset_hf_config(config["model"]["preset"]), **config["model"]["overrides"]}
    t = config["train"]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[t["precision"]]
    init_distributed(ParallelConfig(), seed=1234)  # gloo/nccl + CPU support, as any mcore script needs
    tconfig = hf_to_transformer_config(hf, ParallelConfig(), dtype, on_gpu=torch.cuda.is_available())
    tconfig.calculate_per_token_loss = False
    model = GPTModel(config=tconfig, transformer_layer_spec=get_gpt_layer_local_spec(
        normalization="RMSNorm"), **gpt_model_kwargs(hf, 1))
    model = DistributedDataParallel(tconfig, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(lr=1e-3, bf16=dtype == torch.bfloat16, params_dtype=dtype,
                                                       clip_grad=1.0), [model])
    tconfig.finalize_model_grads_func = finalize_model_grads
    data = DataConfig(**config["data"])
    source = PretrainData(data, token_ids_from_tokenizer(data.tokenizer, hf["vocab_size"]), 1234,
                          t["micro_batch_size"], t["train_iters"] * t["global_batch_size"], 0)
    batches = source.train_iterators(0, 0, 1, 1)[0]

    def forward_step(iterator, model):
        b = next(iterator)
        if torch.cuda.is_available():
            b = {key: value.cuda(non_blocking=True) for key, value in b.items()}
        loss = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        mask = b["loss_mask"].float()
        return loss, lambda out: ((out.float() * mask).sum() / mask.sum(), {})

    forward_backward = get_forward_backward_func()
    times = []
    for _ in range(t["train_iters"]):
        began = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(forward_step_func=forward_step, data_iterator=batches, model=[model],
                         num_microbatches=t["global_batch_size"] // t["micro_batch_size"],
                         seq_length=data.seq_length, micro_batch_size=t["micro_batch_size"])
        optimizer.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    shutdown_distributed()
    return times


def child(mode: str, config_json: str, out: str) -> None:
    config = json.loads(config_json)
    times = run_megaswift(config, Path(out)) if mode == "megaswift" else run_baseline(config)
    print("STEP_TIMES " + json.dumps(times))


def measure(mode: str, config: dict, warmup: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        # keep the caller's PYTHONPATH: on the GPU machine it holds the carried megatron-core wheel
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--config-json", json.dumps(config),
                               "--out", out], capture_output=True, text=True, env=env, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-4000:]}")
        line = next(l for l in proc.stdout.splitlines() if l.startswith("STEP_TIMES "))
        return statistics.median(json.loads(line.split(" ", 1)[1])[warmup:])


def add_run_arguments(parser, steps: int, warmup: int, rounds: int, results: str) -> None:
    """The model shape, batch, precision and rounds of a training benchmark (this one and peer_train.py)."""
    parser.add_argument("--preset", default="tiny-llama")
    parser.add_argument("--overrides", default='{"hidden_size": 256, "intermediate_size": 688, '
                                               '"num_attention_heads": 8, "num_key_value_heads": 4}')
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--child")
    parser.add_argument("--config-json")
    parser.add_argument("--out")
    parser.add_argument("--results-dir", default=str(RESULTS), help=f"where {results} goes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, steps=25, warmup=5, rounds=2, results="train_throughput_<device>.json")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.config_json, args.out)
    from megaswift.data.demo import prepare_demo_data
    data_dir = REPO / "runs" / "bench_data"
    prepare_demo_data(data_dir)
    config = settings(args, data_dir)
    medians = {"baseline": [], "megaswift": []}
    for _ in range(args.rounds):
        for mode in ("baseline", "megaswift"):
            medians[mode].append(measure(mode, config, args.warmup))
    tokens = args.global_batch_size * args.seq_length
    base, ours = min(medians["baseline"]), min(medians["megaswift"])
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"benchmark": "train_throughput", "device": device, "config": config, "rounds": args.rounds,
              "baseline_tokens_per_s": tokens / base, "megaswift_tokens_per_s": tokens / ours,
              "ratio_megaswift_over_baseline": base / ours, "median_step_s": medians, "goal_ratio": 0.95}
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    name = "cpu" if device == "cpu" else "gpu"
    (results_dir / f"train_throughput_{name}.json").write_text(json.dumps(result, indent=2))
    print(f"baseline  {tokens / base:10.0f} tokens/s\nmegaswift {tokens / ours:10.0f} tokens/s\n"
          f"ratio megaswift/baseline = {base / ours:.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
