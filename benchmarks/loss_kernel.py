"""Benchmark the fused loss-scaled cross entropy against the peer recipes, forward + backward.

Baselines, measured in the same run and interleaved with the fused op (so machine load hits all
alike): `F.cross_entropy(reduction="none") * w` with its autograd backward, and on CUDA also
megatron-core's fused vocab-parallel cross entropy followed by the weight multiply (TP=1).
Peak memory is what a method adds on top of the logits it is given (CUDA: the allocator's peak;
CPU: the process's peak RSS, reset through /proc/self/clear_refs).

    python benchmarks/loss_kernel.py --device cpu    # [4096, 32000] fp32
    python benchmarks/loss_kernel.py --device cuda   # [16384, 128256] bf16
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from megaswift.kernels import kernel_report, loss_scaled_cross_entropy

DEFAULTS = {"cpu": (4096, 32000, "float32"), "cuda": (16384, 128256, "bfloat16")}
RESULTS = Path(__file__).resolve().parent / "results"


# Each method returns d(sum of weighted losses)/d(logits) through torch.autograd.grad, which hands
# the gradient on as the output layer's backward would receive it (a leaf's .grad accumulation
# would add a copy that training never makes).
def torch_reference(logits, labels, weights):
    loss = F.cross_entropy(logits, labels, reduction="none") * weights
    return torch.autograd.grad(loss.sum(), logits)[0]


def megaswift_fused(logits, labels, weights):
    return torch.autograd.grad(loss_scaled_cross_entropy(logits, labels, weights).sum(), logits)[0]


def megatron_fused(logits, labels, weights):
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    group = torch.distributed.group.WORLD
    loss = fused_vocab_parallel_cross_entropy(logits[:, None, :], labels[:, None], group)  # [s, b=1, V]
    return torch.autograd.grad((loss[:, 0] * weights).sum(), logits)[0]


class PeakMemory:
    """Bytes a method allocates beyond what exists when `start` is called."""

    def __init__(self, device: str):
        self.device = device

    def start(self):
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (peak RSS) to the current RSS
            self.base = self._status_kb("VmRSS") * 1024

    def stop(self) -> int:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        return self._status_kb("VmHWM") * 1024 - self.base

    @staticmethod
    def _status_kb(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(method, base, labels, weights, device, memory: PeakMemory) -> tuple[float, int]:
    logits = base.clone().requires_grad_(True)  # fresh each time: the fused op consumes its logits
    sync(device)
    memory.start()
    t0 = time.perf_counter()
    grad = method(logits, labels, weights)
    sync(device)
    elapsed = time.perf_counter() - t0
    peak = memory.stop()
    del logits, grad
    return elapsed, peak


def init_single_process_group(device):
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--tokens", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-megatron", action="store_true", help="skip the megatron-core baseline (CUDA)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    d_tokens, d_vocab, d_dtype = DEFAULTS[args.device]
    tokens, vocab = args.tokens or d_tokens, args.vocab or d_vocab
    dtype = getattr(torch, args.dtype or d_dtype)

    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(tokens, vocab, generator=gen) * 2).to(dtype).to(args.device)
    labels = torch.randint(0, vocab, (tokens,), generator=gen).to(args.device)
    weights = torch.rand(tokens, generator=gen).to(args.device)
    methods = {"torch_reference": torch_reference, "megaswift_fused": megaswift_fused}
    if args.device == "cuda" and not args.no_megatron:
        init_single_process_group(args.device)
        methods["megatron_fused_then_weight"] = megatron_fused

    memory = PeakMemory(args.device)
    for method in methods.values():  # warm-up: lazy init, JIT fusers, allocator pools
        measure(method, base, labels, weights, args.device, memory)
    times = {name: [] for name in methods}
    peaks = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, method in methods.items():
            t, peak = measure(method, base, labels, weights, args.device, memory)
            times[name].append(t)
            peaks[name].append(peak)

    logits_bytes = base.numel() * base.element_size()
    results = {name: {"median_s": statistics.median(times[name]), "all_s": times[name],
                      "peak_extra_bytes": max(peaks[name]),
                      "peak_extra_over_logits": max(peaks[name]) / logits_bytes} for name in methods}
    fused = results["megaswift_fused"]
    ratios = {}
    for name in methods:
        if name != "megaswift_fused":
            ratios[f"speedup_vs_{name}"] = results[name]["median_s"] / fused["median_s"]
            saving = 1 - fused["peak_extra_bytes"] / max(results[name]["peak_extra_bytes"], 1)
            ratios[f"peak_memory_saving_vs_{name}"] = saving
    report = {
        "benchmark": "loss_scaled_cross_entropy forward+backward",
        "device": args.device,
        "device_name": (torch.cuda.get_device_name() if args.device == "cuda"
                        else platform.processor() or platform.machine()),
        "cpu_threads": torch.get_num_threads(), "shape": [tokens, vocab],
        "dtype": str(dtype).removeprefix("torch."),
        "logits_bytes": logits_bytes, "repeats": args.repeats, "torch": torch.__version__,
        "kernel_path": kernel_report()["loss_scaled_cross_entropy"][args.device],
        "methods": results, "ratios": ratios,
        "peak_memory_note": "bytes added on top of the given logits during forward+backward, the returned gradient included",
    }
    print(f"[{tokens}, {vocab}] {report['dtype']} on {args.device} ({report['kernel_path']}), "
          f"{args.repeats} repeats, median fwd+bwd:")
    for name, r in results.items():
        print(f"  {name:30s} {r['median_s'] * 1e3:9.1f} ms   "
              f"peak extra {r['peak_extra_bytes'] / 2**20:9.1f} MiB "
              f"({r['peak_extra_over_logits']:.2f}x logits)")
    for name, value in ratios.items():
        print(f"  {name:45s} {value:.2f}")
    out = args.out or RESULTS / f"loss_kernel_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
