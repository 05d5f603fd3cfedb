"""torchrun script (2 processes): a parallel tiny GPT must match a single-process reference.

--modes tp_sp   TP=2 with sequence parallel, megatron DDP + finalize_model_grads (SP norm grads).
--modes moe_ep  8 experts, top-2, alltoall dispatcher, EP=2; each rank has its own batch.
--modes moe_etp same MoE at TP=2 + SP with expert TP=2 (uneven gathers in the dispatcher).
Each rank prints 'PARITY OK <mode> rank <r>' after each mode; any mismatch raises.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402

from megaswift.platform.cpu import apply_cpu_patches  # noqa: E402
from tests.platform.tiny_gpt import batch, build_gpt, forward_backward, gpt_config, init_distributed  # noqa: E402

TOL = 1e-5


def shard_like(full: torch.Tensor, param: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's TP shard of a full tensor, the way megatron's CPU init splits it."""
    if not getattr(param, "tensor_model_parallel", False) or world == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = torch.split(full, param.shape[dim] // stride, dim=dim)
    return torch.cat(pieces[rank::world], dim=dim)


def reference(moe: bool, batches):
    """Single-process (TP=EP=1) model: its weights, the loss and the grads for each batch."""
    init_distributed(tp=1)
    model = build_gpt(gpt_config(moe=moe))
    losses, grads = [], []
    for data in batches:
        model.zero_grad()
        losses.append(forward_backward(model, data))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return {n: p.detach().clone() for n, p in model.named_parameters()}, losses, grads


def check_close(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    diff = (got - want).abs().max().item()
    assert diff <= TOL * max(1.0, want.abs().max().item()), f"{what}: max diff {diff}"


def run_tp_sp(rank: int, world: int) -> None:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads

    data = batch(seed=7)
    ref_weights, (ref_loss,), (ref_grads,) = reference(False, [data])
    init_distributed(tp=world)
    config = gpt_config(tp=world, sp=True)
    config.finalize_model_grads_func = finalize_model_grads  # all-reduces the SP norm grads
    model = DistributedDataParallel(config, DistributedDataParallelConfig(), build_gpt(config))
    for name, p in model.module.named_parameters():  # the same seed gave the same full weights
        check_close(f"weight {name}", p.data, shard_like(ref_weights[name], p, rank, world))
    loss = forward_backward(model, data)
    assert abs(loss - ref_loss) <= TOL, f"loss {loss} != reference {ref_loss}"
    tagged = [n for n, p in model.module.named_parameters() if getattr(p, "sequence_parallel", False)]
    assert any("layernorm" in n for n in tagged), f"no SP-tagged norm weights: {tagged}"
    for name, p in model.module.named_parameters():
        check_close(f"grad {name}", p.main_grad, shard_like(ref_grads[name], p, rank, world))


def run_moe_ep(rank: int, world: int) -> None:
    """EP=2, rank r sees batch r: an expert's grad sums both batches, other grads are rank-local."""
    batches = [batch(seed=7 + r) for r in range(world)]
    ref_weights, ref_losses, ref_grads = reference(True, batches)
    init_distributed(tp=1, ep=world, etp=1)
    model = build_gpt(gpt_config(ep=world, etp=1, moe=True))
    experts_per_rank = 8 // world
    names = {n: global_expert_name(n, rank, experts_per_rank) for n, _ in model.named_parameters()}
    with torch.no_grad():  # EP ranks draw their local experts alike: copy the reference's in
        for name, p in model.named_parameters():
            p.copy_(ref_weights[names[name]])
    loss = forward_backward(model, batches[rank])
    assert abs(loss - ref_losses[rank]) <= TOL, f"loss {loss} != reference {ref_losses[rank]}"
    for name, p in model.named_parameters():
        if "local_experts" in name:
            want = sum(g[names[name]] for g in ref_grads)
        else:
            want = ref_grads[rank][name]
        check_close(f"grad {name}", p.grad, want)


def run_moe_etp(rank: int, world: int) -> None:
    """TP=2 + SP with expert TP=2: the alltoall dispatcher gathers uneven token counts over TP."""
    data = batch(seed=7)
    ref_weights, (ref_loss,), (ref_grads,) = reference(True, [data])
    init_distributed(tp=world, ep=1, etp=world)
    model = build_gpt(gpt_config(tp=world, sp=True, etp=world, moe=True))
    for name, p in model.named_parameters():
        check_close(f"weight {name}", p.data, shard_like(ref_weights[name], p, rank, world))
    loss = forward_backward(model, data)
    assert abs(loss - ref_loss) <= TOL, f"loss {loss} != reference {ref_loss}"
    for name, p in model.named_parameters():
        if getattr(p, "sequence_parallel", False):
            torch.distributed.all_reduce(p.grad)  # what finalize_model_grads does for SP weights
        check_close(f"grad {name}", p.grad, shard_like(ref_grads[name], p, rank, world))


def global_expert_name(name: str, ep_rank: int, experts_per_rank: int) -> str:
    marker = "local_experts."
    if marker not in name:
        return name
    head, tail = name.split(marker)
    local, rest = tail.split(".", 1)
    return f"{head}{marker}{ep_rank * experts_per_rank + int(local)}.{rest}"


RUNS = {"tp_sp": run_tp_sp, "moe_ep": run_moe_ep, "moe_etp": run_moe_etp}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", nargs="+", choices=sorted(RUNS), required=True)
    modes = parser.parse_args().modes
    assert apply_cpu_patches(), "expected a machine without CUDA"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    for mode in modes:  # one launch for all modes: process start-up is most of the cost
        RUNS[mode](rank, world)
        print(f"PARITY OK {mode} rank {rank}", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
