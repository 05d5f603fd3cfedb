"""A one-process gloo group + megatron parallel state, for building models inside a converter process."""
import contextlib
import os
import socket

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_process_model_parallel():
    """TP=PP=EP=1 in a world of one; leaves any group it did not create alone."""
    from megatron.core import parallel_state

    from megaswift.platform.cpu import apply_cpu_patches

    apply_cpu_patches()
    created = not torch.distributed.is_initialized()
    if created:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                                             rank=0, world_size=1)
    elif torch.distributed.get_world_size() != 1:
        raise RuntimeError("conversion runs in one process; found a process group of "
                           f"{torch.distributed.get_world_size()} ranks (run it without torchrun)")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel()
    try:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(int(os.environ.get("MEGASWIFT_CONVERT_SEED", 1234)))
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            torch.distributed.destroy_process_group()
