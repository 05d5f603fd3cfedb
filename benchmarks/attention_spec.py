"""Forward + backward time of one model under megatron-core's local spec and megaswift's torch spec.

Same weights, same batch; rounds alternate (local, torch, local, torch, ...) so machine noise hits both
alike, each round the median of `--steps` timed steps after one warm-up step. Two batches: plain causal
rows (no mask) and packed rows (a block-diagonal mask, 4 samples per row). On CPU it times both wall
clock and this process's CPU time: on a shared machine (the 2-core development box runs several jobs at
once) wall time mostly measures the neighbours, while CPU time on a fixed number of threads (`--threads`,
default 1) measures the work. Reports per spec the median of the round medians and their spread
(min..max), and local/torch ratios per round (> 1: the torch spec is faster). Writes
benchmarks/results/attention_spec_<device>.json.

    python benchmarks/attention_spec.py [--seq-length 1024] [--rounds 5] [--steps 3] [--threads 1]
"""
import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 8,
         "num_key_value_heads": 4, "max_position_embeddings": 4096}


def build(spec: str, hf: dict, dtype: torch.dtype, device: str):
    from megaswift.config import ParallelConfig
    from megaswift.models import hf_to_transformer_config
    from megaswift.models.builder import build_model_chunks
    config = hf_to_transformer_config(hf, ParallelConfig(), dtype, on_gpu=device == "cuda")
    (model,) = build_model_chunks(hf, config, spec)
    return model.to(device)


def batches(seq: int, micro: int, vocab: int, device: str) -> dict:
    """(tokens, position_ids, attention_mask) of plain causal rows and of rows packing 4 samples each."""
    from megaswift.data.sft.packing import block_diagonal_causal_mask
    tokens = torch.randint(0, vocab, (micro, seq), generator=torch.Generator().manual_seed(0))
    quarter = seq // 4
    mask = block_diagonal_causal_mask(torch.tensor([0, quarter, 2 * quarter, 3 * quarter, seq]), seq)
    inputs = {"causal": (tokens, torch.arange(seq).expand(micro, -1), None),
              "packed": (tokens, torch.arange(seq).remainder(quarter).expand(micro, -1),
                         mask.expand(micro, -1, -1, -1))}
    return {name: tuple(None if x is None else x.to(device) for x in batch) for name, batch in inputs.items()}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def step_times(model, inputs, steps: int, device: str, clocks: dict) -> dict[str, float]:
    """Median seconds of one forward + backward (summed token losses) by each clock, after a warm-up step."""
    times = {clock: [] for clock in clocks}
    for i in range(steps + 1):
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        start = {clock: read() for clock, read in clocks.items()}
        model(*inputs, labels=inputs[0]).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            for clock, read in clocks.items():
                times[clock].append(read() - start[clock])
    return {clock: statistics.median(values) for clock, values in times.items()}


def summary(local: list[float], torch_spec: list[float]) -> dict:
    spread = lambda values: {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values),
                             "rounds_s": values}
    ratios = [a / b for a, b in zip(local, torch_spec)]
    return {"local": spread(local), "torch": spread(torch_spec),
            "local_over_torch": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}}


def describe(name: str, result: dict) -> str:
    ms = lambda r: f"{r['median_s'] * 1e3:.0f} ms [{r['min_s'] * 1e3:.0f}..{r['max_s'] * 1e3:.0f}]"
    ratio = result["local_over_torch"]
    return (f"{name}: local {ms(result['local'])}, torch {ms(result['torch'])}, local/torch "
            f"{ratio['median']:.2f} [{ratio['min']:.2f}..{ratio['max']:.2f}]")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from megaswift.config import ParallelConfig
    from megaswift.models import preset_hf_config
    from megaswift.train.distributed import init_distributed, shutdown_distributed

    device = "cuda" if torch.cuda.is_available() else "cpu"
    clocks = CLOCKS if device == "cpu" else {"wall": CLOCKS["wall"]}  # host CPU time says nothing of a GPU
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    init_distributed(ParallelConfig(), seed=1234)
    try:
        hf = {**preset_hf_config("tiny-llama"), **SHAPE}
        models = {"local": build("local", hf, dtype, device)}
        models["torch"] = build("torch", hf, dtype, device)
        models["torch"].load_state_dict(models["local"].state_dict())
        data = batches(args.seq_length, args.micro_batch_size, hf["vocab_size"], device)
        results = {}
        for batch, inputs in data.items():
            rounds = {spec: [] for spec in models}
            for _ in range(args.rounds):
                for spec, model in models.items():
                    rounds[spec].append(step_times(model, inputs, args.steps, device, clocks))
            results[batch] = {clock: summary([r[clock] for r in rounds["local"]], [r[clock] for r in rounds["torch"]])
                              for clock in clocks}
            for clock in clocks:
                print(describe(f"{batch} ({clock} time)", results[batch][clock]), flush=True)
        record = {
            "what": "forward+backward of one micro-batch, local vs torch layer spec (same weights), alternated rounds",
            "model": {**SHAPE, "vocab_size": hf["vocab_size"]}, "seq_length": args.seq_length,
            "micro_batch_size": args.micro_batch_size, "precision": args.precision, "rounds": args.rounds,
            "steps_per_round": args.steps, "device": torch.cuda.get_device_name() if device == "cuda" else
            platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_average_1_5_15min_at_end": os.getloadavg(), "results": results,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"attention_spec_{device}.json"
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {out}")
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
