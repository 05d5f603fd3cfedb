"""Run under torchrun (2 processes, TP=2): RNG state saved per rank through dist_checkpointing comes back per
rank; at another layout the load reseeds instead. Exits non-zero on a mismatch."""
import random
import sys

import numpy
import torch
import torch.distributed as dist


def draws() -> list[float]:
    """One draw from each generator a training step uses: python, numpy, torch, megatron's TP tracker."""
    from megatron.core import tensor_parallel
    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = torch.rand(2).tolist()
    return [random.random(), float(numpy.random.rand()), torch.rand(1).item(), *tracked]


def main(folder: str) -> None:
    from megatron.core import dist_checkpointing, parallel_state

    from megaswift.checkpointing import rng
    from megaswift.config import ParallelConfig
    from megaswift.train.distributed import init_distributed
    init_distributed(ParallelConfig(tensor=2), seed=1234)
    draws()  # away from the seeded state
    dist_checkpointing.save(rng.sharded_rng_state(), folder)
    expected = draws()
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, expected)
    assert every_rank[0][3:] != every_rank[1][3:], "TP ranks' tracker states should differ"

    rng.reseed(999)
    load = rng.RngLoad(folder)
    assert load.problem is None, load.problem
    assert load.restore(dist_checkpointing.load(load.request(), folder), seed=5, iteration=1)
    assert draws() == expected, "restored generators must draw what they drew after the save"

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    other = rng.RngLoad(folder)
    assert "tensor 2 -> 1" in (other.problem or ""), other.problem
    assert not other.restore(dist_checkpointing.load(other.request(), folder), seed=5, iteration=1)
    after_reseed = draws()
    rng.reseed(6)
    assert after_reseed == draws(), "another layout reseeds from seed + iteration"
    dist.barrier()
    print(f"rank {dist.get_rank()} ok", flush=True)


if __name__ == "__main__":  # dist_checkpointing's writer process re-imports __main__
    main(sys.argv[1])
