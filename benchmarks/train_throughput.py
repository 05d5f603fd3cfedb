"""tokens/s of `megaswift pt` against a minimal hand-written megatron-core loop, same model, data and layout.

Both run in child processes, alternated (A B A B ...) so machine noise hits both alike; each reports the
median step time after warm-up. Writes benchmarks/results/train_throughput_<device>.json.

    python benchmarks/train_throughput.py [--preset tiny-llama] [--steps 30] [--rounds 2]
"""
import argparse
import json
import time
from pathlib import Path

from bench_harness import (add_run_arguments, check_run_arguments, measure, portable, print_result, settings,
                           spread)


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
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megaswift.config import ParallelConfig
    from megaswift.data.pretrain import PretrainData, token_ids_from_tokenizer
    from megaswift.config import DataConfig
    from megaswift.models import gpt_model_kwargs, hf_to_transformer_config, preset_hf_config
    from megaswift.models.builder import layer_spec, resolve_layer_spec
    from megaswift.train.distributed import init_distributed, shutdown_distributed

    hf = {**preset_hf_config(config["model"]["preset"]), **config["model"]["overrides"]}
    t = config["train"]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[t["precision"]]
    init_distributed(ParallelConfig(), seed=1234)  # gloo/nccl + CPU support, as any mcore script needs
    tconfig = hf_to_transformer_config(hf, ParallelConfig(), dtype, on_gpu=torch.cuda.is_available())
    tconfig.calculate_per_token_loss = False
    # the same layer spec as megaswift's run (model.layer_spec, `auto` by default: TE or torch attention on a GPU,
    # local on CPU) and the family's own layers (qk-norm, ...): only the loop around the model differs
    spec = resolve_layer_spec(config["model"].get("layer_spec", "auto"))
    model = GPTModel(config=tconfig, transformer_layer_spec=layer_spec(hf, tconfig, spec), **gpt_model_kwargs(hf, 1))
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
    print_result(run_megaswift(config, Path(out)) if mode == "megaswift" else run_baseline(config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, steps=25, warmup=5, rounds=2, results="train_throughput_<device>.json")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.config_json, args.out)
    check_run_arguments(parser, args)
    from megaswift.data.demo import prepare_demo_data
    data_dir = Path(args.data_dir)
    prepare_demo_data(data_dir)
    config = settings(args, data_dir)
    medians = {"baseline": [], "megaswift": []}
    for _ in range(args.rounds):
        for mode in ("baseline", "megaswift"):
            medians[mode].append(measure(Path(__file__), mode, config, args.warmup)["median_step_s"])
    tokens = args.global_batch_size * args.seq_length
    base, ours = min(medians["baseline"]), min(medians["megaswift"])
    # each round's ratio, so the spread shows whether a difference is the loop or the machine's noise
    per_round = spread([b / m for b, m in zip(medians["baseline"], medians["megaswift"])])
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"benchmark": "train_throughput", "device": device, "config": portable(config), "rounds": args.rounds,
              "baseline_tokens_per_s": tokens / base, "megaswift_tokens_per_s": tokens / ours,
              "ratio_megaswift_over_baseline": base / ours, "ratio_per_round": per_round,
              "median_step_s": medians, "goal_ratio": 0.95}
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    name = "cpu" if device == "cpu" else "gpu"
    (results_dir / f"train_throughput_{name}.json").write_text(json.dumps(result, indent=2))
    print(f"baseline  {tokens / base:10.0f} tokens/s\nmegaswift {tokens / ours:10.0f} tokens/s\n"
          f"ratio megaswift/baseline = {base / ours:.3f} (goal >= 0.95); per round min {per_round['min']:.3f} "
          f"median {per_round['median']:.3f} max {per_round['max']:.3f}")

if __name__ == "__main__":
    main()
