"""Random number generator state in checkpoints, per rank, so a resumed run draws (dropout masks above all)
exactly what an uninterrupted one would.

A rank draws from python's `random`, numpy's global generator, torch's CPU generator, its CUDA device's
generator and megatron-core's model-parallel tracker (`tensor_parallel.get_cuda_rng_tracker()`: named CUDA
states forked for tensor-parallel regions, whose seed differs per TP rank). On CPU, megaswift routes CUDA RNG
to the CPU generator (platform/cpu.py), so there the tracker holds CPU generator states.

On disk: one dist_checkpointing ShardedObject entry per global rank ("rng_state/shard_<rank>_<world>").
megatron-LM keys its rng_state by (PP, TP) and keeps one DP replica, assuming data-parallel ranks draw alike;
one entry per rank makes no such assumption. A rank's state belongs to its place in the layout, so it is
restored only at the layout it was saved at (world size, TP, PP, VPP, CP, EP, recorded in the common state
beside it). At another layout, or from a checkpoint saved before megaswift recorded RNG state, the run warns
and reseeds every generator from train.seed and the iteration: training goes on, without replaying the
dropout masks of step 1, but not bit-identically.
"""
import contextlib
import random
import sys
from pathlib import Path

import numpy
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

RNG_KEY = "rng_state"
LAYOUT_KEY = "rng_layout"


def _rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def current_layout() -> dict:
    """What decides which state a rank needs: the world size and the model-parallel sizes."""
    return {"world_size": _rank_and_world()[1],
            "tensor": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
            "virtual_pipeline": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
            "context": parallel_state.get_context_parallel_world_size(),
            "expert": parallel_state.get_expert_model_parallel_world_size()}


def capture() -> dict:
    """This process's generator states (copies: later draws do not change them)."""
    state = {"python": random.getstate(), "numpy": numpy.random.get_state(), "torch_cpu": torch.get_rng_state(),
             "tracker": {name: value.clone() for name, value in
                         tensor_parallel.get_cuda_rng_tracker().get_states().items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict) -> None:
    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states({name: value.clone() for name, value in
                                                       state["tracker"].items()})


def reseed(seed: int) -> None:
    """Every generator from one seed, as megatron-core seeds a run (tracker states per TP rank included)."""
    random.seed(seed)
    numpy.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


@contextlib.contextmanager
def preserved():
    """Work inside (building data, say) leaves the training generators as they were, so a resumed run and
    an uninterrupted one reach their next step with the same states whatever that work draws."""
    state = capture()
    try:
        yield
    finally:
        restore(state)


def sharded_rng_state() -> dict:
    """What a save adds to its state dict: this rank's states and (common to all ranks) the layout."""
    rank, world = _rank_and_world()
    return {RNG_KEY: ShardedObject(RNG_KEY, capture(), (world,), (rank,), replica_id=0),
            LAYOUT_KEY: current_layout()}


class RngLoad:
    """Restores the RNG state of a checkpoint being resumed, or says why it cannot and reseeds.

    Use: `request()` into the state dict handed to dist_checkpointing.load, then `restore(loaded, ...)`."""

    def __init__(self, ckpt_dir: str | Path):
        self.ckpt_dir = Path(ckpt_dir)
        saved = dist_checkpointing.load_common_state_dict(str(ckpt_dir)).get(LAYOUT_KEY)
        here = current_layout()
        if saved is None:
            self.problem = "it holds no RNG state (saved before megaswift recorded it)"
        elif saved != here:
            changed = ", ".join(f"{key} {saved.get(key)} -> {here[key]}" for key in here if saved.get(key) != here[key])
            self.problem = f"its RNG state was saved per rank at another layout ({changed})"
        else:
            self.problem = None

    def request(self) -> dict:
        if self.problem is not None:
            return {}
        rank, world = _rank_and_world()
        return {RNG_KEY: ShardedObject(RNG_KEY, None, (world,), (rank,), replica_id=0)}

    def restore(self, loaded: dict, seed: int, iteration: int) -> bool:
        """True when the saved states were restored; else every generator is reseeded (and rank 0 warns)."""
        if self.problem is None:
            restore(loaded[RNG_KEY])
            return True
        reseed(seed + iteration)
        if _rank_and_world()[0] == 0:
            print(f"megaswift: warning: {self.ckpt_dir}: {self.problem}; random generators reseeded from "
                  f"train.seed + iteration ({seed} + {iteration}): dropout and other random draws differ from "
                  f"an uninterrupted run", file=sys.stderr, flush=True)
        return False
