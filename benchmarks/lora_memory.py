"""LoRA (r=8, all linear layers) against full fine-tuning of the same model, in the same run: peak memory,
gradient + optimizer-state bytes, step time.

Each measurement is a child process (so its peak RSS is its own), built from megaswift's own pieces
(build_model_chunks, apply_tuner, megatron-core DDP and optimizer, megatron-core's schedule) on random
tokens; full and LoRA alternate (F L F L ...) so machine noise hits both alike, and every round is kept
(the spread shows). Peak memory is the process's peak RSS on CPU, torch.cuda.max_memory_allocated on a
GPU. Gradient + optimizer-state bytes are counted in megatron-core's DDP gradient buffers and the
optimizer's state (Adam moments, and fp32 master weights under bf16). Writes
benchmarks/results/lora_memory_<shape>_<device>.json.

    python benchmarks/lora_memory.py                                  # tiny shape, quick (CI-safe)
    python benchmarks/lora_memory.py --shape llama-3.2-1b [--layers 4] [--precision bf16]
    python benchmarks/lora_memory.py --shape llama-3.2-1b --full-layers 2,4,6   # 24 GiB machines, see below

Full fine-tuning of the whole 1B shape needs ~22 GiB of RSS in fp32 on CPU (16 bytes per parameter plus the
runtime), more than a 24 GiB machine shared with anything else holds. With --full-layers, full fine-tuning is
measured at those layer counts and each figure projected to the shape's layer count along a least-squares
line (every layer adds the same parameters, activations and work, so the figures are linear in the layer count;
the fit's largest residual is reported), while LoRA runs on the whole shape.

Targets (issue 12, r=8 on the Llama-3.2-1B shape): grad+optimizer bytes <= 3% of full's, peak <= 45%,
step time <= full's.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TARGETS = {"state_bytes_ratio": 0.03, "peak_memory_ratio": 0.45, "step_time_ratio": 1.0}
TINY_OVERRIDES = {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 8, "num_key_value_heads": 4}


def hf_config(shape: str, layers: int | None) -> dict:
    from megaswift.models.families import preset_hf_config
    hf = preset_hf_config(shape)
    if shape.startswith("tiny"):
        hf.update(TINY_OVERRIDES)
    if layers:
        hf["num_hidden_layers"] = layers
    return hf


def optimizer_state_bytes(optimizer) -> int:
    """Adam's moments, plus the fp32 master copies a bf16/fp16 optimizer keeps of the trained weights."""
    import torch
    total = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            total += sum(t.numel() * t.element_size() for k, t in state.items() if k != "step" and torch.is_tensor(t))
        for group in getattr(opt, "fp32_from_float16_groups", []):
            total += sum(p.numel() * p.element_size() for p in group)
    return total


def child(kind: str, args) -> dict:
    import torch
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megaswift.config import ParallelConfig, TrainConfig, TunerConfig
    from megaswift.models import hf_to_transformer_config
    from megaswift.models.builder import build_model_chunks
    from megaswift.train.distributed import init_distributed, shutdown_distributed
    from megaswift.train.optimizer import build_optimizer, wrap_with_ddp
    from megaswift.tuners import apply_tuner

    on_gpu = torch.cuda.is_available()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    hf = hf_config(args.shape, args.layers)
    parallel = ParallelConfig()
    init_distributed(parallel, seed=1234)
    config = hf_to_transformer_config(hf, parallel, dtype, on_gpu=on_gpu)
    config.calculate_per_token_loss = False
    chunks = build_model_chunks(hf, config, "local")  # adapters need megatron-core's local layers
    if on_gpu:
        chunks = [c.cuda() for c in chunks]
    chunks = apply_tuner(chunks, TunerConfig(type=kind, rank=args.rank, alpha=2.0 * args.rank), hf)
    model = wrap_with_ddp(chunks, config, parallel)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4, clip_grad=1.0), parallel, dtype)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    device = "cuda" if on_gpu else "cpu"
    tokens = torch.randint(0, hf["vocab_size"], (args.micro_batch_size, args.seq_length + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(args.seq_length, device=device).unsqueeze(0).expand_as(inputs)

    def forward_step(iterator, module):
        next(iterator)
        return module(inputs, positions, None, labels=labels), lambda out: (out.float().mean(), {})

    times = []
    for _ in range(args.steps):
        began = time.perf_counter()
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=model,
                                    num_microbatches=1, seq_length=args.seq_length,
                                    micro_batch_size=args.micro_batch_size)
        optimizer.step()
        if on_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    grad_bytes = sum(b.grad_data.numel() * b.grad_data.element_size() for m in model
                     for b in list(m.buffers) + list(m.expert_parallel_buffers))
    result = {
        "trainable_params": sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for c in chunks for p in c.parameters()),
        "grad_bytes": grad_bytes, "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "step_time_s": statistics.median(times[args.warmup:]) if len(times) > args.warmup else times[-1],
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if on_gpu else
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    shutdown_distributed()
    return result


def measure(kind: str, argv: list[str], layers: int | None = None) -> dict:
    if layers is not None:
        argv = [*argv, "--layers", str(layers)]  # argparse keeps the last value given
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    proc = subprocess.run([sys.executable, __file__, *argv, "--child", kind], capture_output=True, text=True,
                          env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} run failed:\n{proc.stderr[-4000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line.split(" ", 1)[1])


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarise(rounds: dict[str, list[dict]]) -> dict:
    """Ratios LoRA / full: byte counts are exact (identical every round); peak memory and step time use
    each side's best round, with every round's value kept beside them."""
    def best(kind, key):
        return min(r[key] for r in rounds[kind])
    state = {k: rounds[k][0]["grad_bytes"] + rounds[k][0]["optimizer_state_bytes"] for k in rounds}
    return {
        "state_bytes_ratio": state["lora"] / state["full"],
        "peak_memory_ratio": best("lora", "peak_memory_bytes") / best("full", "peak_memory_bytes"),
        "step_time_ratio": best("lora", "step_time_s") / best("full", "step_time_s"),
        "grad_plus_optimizer_bytes": state,
        "spread": {k: {"peak_memory_bytes": [r["peak_memory_bytes"] for r in v],
                       "step_time_s": [r["step_time_s"] for r in v]} for k, v in rounds.items()},
    }


def linear_projection(points: dict[int, float], at: int) -> tuple[float, float]:
    """Least-squares line through (layers, value): the value at `at` layers and the largest residual, relative."""
    xs, ys = list(points), list(points.values())
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    line = lambda x: mean_y + slope * (x - mean_x)  # noqa: E731
    return line(at), max(abs(line(x) - y) / y for x, y in points.items())


def projected_full(full_rounds: dict[int, list[dict]], at: int) -> dict:
    """Full fine-tuning's figures at `at` layers from its runs at fewer layers (best round of each)."""
    keys = ("peak_memory_bytes", "step_time_s")
    projected, residuals = {}, {}
    for key in keys:
        projected[key], residuals[key] = linear_projection(
            {layers: min(r[key] for r in runs) for layers, runs in full_rounds.items()}, at)
    for key in ("grad_bytes", "optimizer_state_bytes", "trainable_params", "total_params"):
        value, residuals[key] = linear_projection({layers: runs[0][key] for layers, runs in full_rounds.items()}, at)
        projected[key] = round(value)  # counts: exactly linear in the layer count
    return {**projected, "projected_from_layers": sorted(full_rounds), "max_relative_residual": residuals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny-llama", help="a model preset: tiny-llama (default), llama-3.2-1b")
    parser.add_argument("--layers", type=int, default=None,
                        help="override the number of layers (where full fine-tuning of the whole shape does not fit)")
    parser.add_argument("--full-layers", default=None,
                        help="comma-separated layer counts: measure full fine-tuning at these and project it to the "
                             "whole shape (LoRA runs on the whole shape)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)))
        return
    argv = [a for a in sys.argv[1:]]
    rounds = {"full": [], "lora": []}
    full_layers = [int(x) for x in args.full_layers.split(",")] if args.full_layers else []
    full_rounds = {layers: [] for layers in full_layers}
    for _ in range(args.rounds):
        for layers in full_layers:
            full_rounds[layers].append(measure("full", argv, layers))
        for kind in ("lora",) if full_layers else ("full", "lora"):
            rounds[kind].append(measure(kind, argv))
    extra = {}
    if full_layers:
        whole = args.layers or hf_config(args.shape, None)["num_hidden_layers"]
        rounds["full"] = [projected_full(full_rounds, whole)]
        extra = {"full_measured_at_layers": {str(k): v for k, v in full_rounds.items()},
                 "full_is_projected": True}
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    summary = summarise(rounds)
    result = {"benchmark": "lora_memory", "device": device, "shape": args.shape, "layers": args.layers,
              "settings": {k: v for k, v in vars(args).items() if k not in ("child", "results_dir")},
              "rounds": rounds, **summary, **extra, "targets": TARGETS}
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = f"_{args.layers}layers" if args.layers else ("_projected" if full_layers else "")
    (out / f"lora_memory_{args.shape}{layers}_{'cpu' if device == 'cpu' else 'gpu'}.json").write_text(
        json.dumps(result, indent=2))
    gib = 2 ** 30
    for kind in ("full", "lora"):
        r = rounds[kind][0]
        print(f"{kind + ('*' if kind == 'full' and full_layers else ''):5} trainable {r['trainable_params']:>13,} / {r['total_params']:,} params | grad+optimizer "
              f"{summary['grad_plus_optimizer_bytes'][kind] / gib:8.3f} GiB | peak "
              f"{[round(x['peak_memory_bytes'] / gib, 2) for x in rounds[kind]]} GiB | step "
              f"{[round(x['step_time_s'], 3) for x in rounds[kind]]} s")
    for key, target in TARGETS.items():
        print(f"{key:18} lora/full = {summary[key]:.4f} (target <= {target})")
    if full_layers:
        print(f"* full fine-tuning projected from {full_layers} layers; largest relative residual of the fit: "
              f"{max(rounds['full'][0]['max_relative_residual'].values()):.4f}")


if __name__ == "__main__":
    main()
