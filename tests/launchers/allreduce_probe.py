"""Run under torchrun: checks the world the launcher built and trains a tiny data-parallel model by hand.

Writes out_dir/rank<R>.json with what each rank saw, so a test can compare a two-agent ("two nodes") launch
with a one-agent launch of the same world size.
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def train_losses(rank: int, world: int, steps: int = 4) -> list[float]:
    """Linear regression, each rank on its own shard, gradients averaged with all_reduce (what DDP does)."""
    torch.manual_seed(0)
    weight = torch.zeros(8, requires_grad=True)
    data = torch.randn(world * 16, 8, generator=torch.Generator().manual_seed(1))
    target = data @ torch.arange(8.0)
    shard = slice(rank * 16, (rank + 1) * 16)
    losses = []
    for _ in range(steps):
        loss = ((data[shard] @ weight - target[shard]) ** 2).mean()
        loss.backward()
        dist.all_reduce(weight.grad)
        reported = loss.detach().clone()
        dist.all_reduce(reported)
        losses.append(reported.item() / world)
        with torch.no_grad():
            weight -= 0.05 * weight.grad / world
            weight.grad = None
    return losses


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    seen = [None] * world
    dist.all_gather_object(seen, {"rank": rank, "group_rank": int(os.environ["GROUP_RANK"]),
                                  "local_rank": int(os.environ["LOCAL_RANK"]),
                                  "local_world_size": int(os.environ["LOCAL_WORLD_SIZE"])})
    result = {"world_size": world, "rank_sum": total.item(), "seen": seen, "losses": train_losses(rank, world)}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
