"""A one-process gloo group + megatron parallel state, for building models inside a converter process.

A conversion is a library call (`converters.hf2mcore(...)` from a notebook), so everything this sets up
is undone when it ends: the CPU patches of megaswift.platform (applied only for the conversion), the
process group it created, megatron's parallel state, and the RNG state (torch's generators and megatron's
RNG tracker) that seeding megatron's model-parallel RNG replaces.
"""
import contextlib
import os
import socket

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _preserved_rng():
    """model_parallel_cuda_manual_seed reseeds torch's generators (on CPU, through the cuda_rng patch,
    the default CPU one) and replaces megatron's module-level RNG tracker: the caller's random stream
    and tracker continue afterwards as if nothing had happened."""
    from megatron.core.tensor_parallel import random as mcore_random

    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    # megatron-core has no API to read and restore its tracker: these are the module globals it uses.
    tracker = (mcore_random._CUDA_RNG_STATE_TRACKER, mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    try:
        yield
    finally:
        mcore_random._CUDA_RNG_STATE_TRACKER, mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = tracker
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def single_process_model_parallel(replicated: bool = False):
    """TP=PP=EP=1 in a world of one; leaves any group it did not create alone. `replicated`: in a group of
    several ranks (a multi-process conversion), every rank calls this at once and builds the same TP=PP=1 model
    (data parallel over the group), as the meta-model layout needs no more."""
    from megatron.core import parallel_state

    from megaswift.platform import cpu_patches

    with cpu_patches(), _preserved_rng():
        created = not torch.distributed.is_initialized()
        if created:
            torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                                                 rank=0, world_size=1)
        elif torch.distributed.get_world_size() != 1 and not replicated:
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
