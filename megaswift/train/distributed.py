"""Process groups: torch.distributed from torchrun's environment, then megatron-core's parallel state."""
import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megaswift.config import ParallelConfig
from megaswift.platform import dist_backend
from megaswift.platform.cpu import apply_cpu_patches


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int


def world_from_env() -> WorldInfo:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python` run is a world of one."""
    return WorldInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(parallel: ParallelConfig, seed: int, timeout_minutes: int = 10) -> WorldInfo:
    world = world_from_env()
    if not torch.cuda.is_available():
        apply_cpu_patches()
    else:
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        # A world of one gets its own free port through init_method, never through os.environ: child
        # processes inherit the environment, and a stale MASTER_PORT there makes their rendezvous collide.
        init_method = f"tcp://127.0.0.1:{_free_port()}" \
            if world.world_size == 1 and "MASTER_ADDR" not in os.environ else None
        dist.init_process_group(backend=dist_backend(), init_method=init_method, rank=world.rank,
                                world_size=world.world_size, timeout=datetime.timedelta(minutes=timeout_minutes))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        context_parallel_size=parallel.context,
        expert_model_parallel_size=parallel.expert,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return world


def shutdown_distributed() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
